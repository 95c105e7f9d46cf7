// A small JSON value for message bodies (AssemblyScript 0.14 has no JSON of its own).
// Numbers keep their text, so a body goes out as it came in except where changed.

export const NULL: i32 = 0;
export const BOOL: i32 = 1;
export const NUMBER: i32 = 2;
export const STRING: i32 = 3;
export const ARRAY: i32 = 4;
export const OBJECT: i32 = 5;

export class JSONValue {
  kind: i32 = NULL;
  text: string = "";       // a string's value, a number's text
  flag: bool = false;      // a boolean's value
  items: Array<JSONValue> = new Array<JSONValue>();
  keys: Array<string> = new Array<string>();

  static str(value: string): JSONValue {
    let v = new JSONValue();
    v.kind = STRING;
    v.text = value;
    return v;
  }

  /** A member of an object (null when absent or not an object). */
  get(key: string): JSONValue | null {
    if (this.kind != OBJECT) return null;
    for (let i = 0; i < this.keys.length; i++) {
      if (this.keys[i] == key) return this.items[i];
    }
    return null;
  }

  /** Sets a member of an object. */
  set(key: string, value: JSONValue): void {
    for (let i = 0; i < this.keys.length; i++) {
      if (this.keys[i] == key) {
        this.items[i] = value;
        return;
      }
    }
    this.keys.push(key);
    this.items.push(value);
  }

  toString(): string {
    if (this.kind == NULL) return "null";
    if (this.kind == BOOL) return this.flag ? "true" : "false";
    if (this.kind == NUMBER) return this.text;
    if (this.kind == STRING) return quote(this.text);
    let out = this.kind == ARRAY ? "[" : "{";
    for (let i = 0; i < this.items.length; i++) {
      if (i > 0) out += ",";
      if (this.kind == OBJECT) out += quote(this.keys[i]) + ":";
      out += this.items[i].toString();
    }
    return out + (this.kind == ARRAY ? "]" : "}");
  }
}

function quote(s: string): string {
  let out = "\"";
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c == 34) out += "\\\"";
    else if (c == 92) out += "\\\\";
    else if (c == 10) out += "\\n";
    else if (c == 13) out += "\\r";
    else if (c == 9) out += "\\t";
    else if (c < 32) {
      let hex = c.toString(16);
      while (hex.length < 4) hex = "0" + hex;
      out += "\\u" + hex;
    } else out += String.fromCharCode(c);
  }
  return out + "\"";
}

class Parser {
  s: string;
  i: i32 = 0;
  failed: bool = false;

  constructor(s: string) {
    this.s = s;
  }

  space(): void {
    while (this.i < this.s.length) {
      let c = this.s.charCodeAt(this.i);
      if (c != 32 && c != 9 && c != 10 && c != 13) break;
      this.i++;
    }
  }

  value(): JSONValue {
    this.space();
    let v = new JSONValue();
    if (this.i >= this.s.length) {
      this.failed = true;
      return v;
    }
    let c = this.s.charCodeAt(this.i);
    if (c == 123) {           // {
      v.kind = OBJECT;
      this.i++;
      this.space();
      if (this.peek() == 125) { this.i++; return v; }
      while (!this.failed) {
        this.space();
        if (this.peek() != 34) { this.failed = true; break; }
        let key = this.string();
        this.space();
        if (this.peek() != 58) { this.failed = true; break; }
        this.i++;
        v.keys.push(key);
        v.items.push(this.value());
        this.space();
        let next = this.peek();
        this.i++;
        if (next == 125) break;
        if (next != 44) { this.failed = true; break; }
      }
    } else if (c == 91) {     // [
      v.kind = ARRAY;
      this.i++;
      this.space();
      if (this.peek() == 93) { this.i++; return v; }
      while (!this.failed) {
        v.items.push(this.value());
        this.space();
        let next = this.peek();
        this.i++;
        if (next == 93) break;
        if (next != 44) { this.failed = true; break; }
      }
    } else if (c == 34) {
      v.kind = STRING;
      v.text = this.string();
    } else if (this.s.startsWith("true", this.i)) {
      v.kind = BOOL; v.flag = true; this.i += 4;
    } else if (this.s.startsWith("false", this.i)) {
      v.kind = BOOL; this.i += 5;
    } else if (this.s.startsWith("null", this.i)) {
      this.i += 4;
    } else {
      let start = this.i;
      while (this.i < this.s.length) {
        let d = this.s.charCodeAt(this.i);
        if ((d >= 48 && d <= 57) || d == 45 || d == 43 || d == 46 || d == 101 || d == 69) this.i++;
        else break;
      }
      if (this.i == start) this.failed = true;
      v.kind = NUMBER;
      v.text = this.s.substring(start, this.i);
    }
    return v;
  }

  peek(): i32 {
    return this.i < this.s.length ? this.s.charCodeAt(this.i) : -1;
  }

  string(): string {
    this.i++; // opening quote
    let out = "";
    while (this.i < this.s.length) {
      let c = this.s.charCodeAt(this.i);
      this.i++;
      if (c == 34) return out;
      if (c == 92) {
        let e = this.s.charCodeAt(this.i);
        this.i++;
        if (e == 110) out += "\n";
        else if (e == 116) out += "\t";
        else if (e == 114) out += "\r";
        else if (e == 98) out += "\b";
        else if (e == 102) out += "\f";
        else if (e == 117) {
          out += String.fromCharCode(<i32>parseInt(this.s.substring(this.i, this.i + 4), 16));
          this.i += 4;
        } else out += String.fromCharCode(e);
      } else out += String.fromCharCode(c);
    }
    this.failed = true;
    return out;
  }
}

/** Parses JSON text; null when it is not JSON. */
export function parse(text: string): JSONValue | null {
  let p = new Parser(text);
  let v = p.value();
  p.space();
  if (p.failed || p.i != text.length) return null;
  return v;
}
