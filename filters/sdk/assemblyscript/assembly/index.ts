// NIP Plugin SDK v2 for TypeScript (AssemblyScript 0.14, on @solo-io/proxy-runtime 0.1.8).
//
// A plugin is a message handler (filters/sdk/MESSAGE.md says what a message holds):
//
//   export * from "nip-plugin/assembly/abi";   // the ABI entry points, SDK's included
//   import { Plugin, Message, Context, Outcome } from "nip-plugin/assembly/index";
//
//   function handle(message: Message, ctx: Context): Outcome {
//     if (message.priority == "low") return Outcome.reply(503, "busy", "text/plain");
//     message.stamp("seen-by", ctx.name);
//     return Outcome.next(message);
//   }
//   new Plugin("hello").version("1.0.0").onMessage(handle).run();
//
// AssemblyScript 0.14 has neither closures nor async/await, so an HTTP call takes the
// function to continue with: `return ctx.httpCall(message, "users", "/users/me", next)`,
// where `afterLookup(message, response, ctx): Outcome` gets the message back with the
// answer. Handlers are top-level functions; state travels in the message.

import {
  RootContext, Context as StreamBase, registerRootContext, FilterHeadersStatusValues,
  FilterDataStatusValues, stream_context, HeaderPair, Headers, continue_request,
  continue_response, send_local_response, GrpcStatusValues, log, LogLevelValues, BaseContext,
} from "@solo-io/proxy-runtime";
import * as host from "./host";
import { JSONValue, parse } from "./json";

export { JSONValue, parse } from "./json";
export { NULL, BOOL, NUMBER, STRING, ARRAY, OBJECT } from "./json";

/** The NIP plugin API version this SDK speaks. */
export const API_VERSION = "2.0";

const META_PREFIX = "x-nip-meta-";

/** One request or response, as the plugin sees it. */
export class Message {
  /** "request" or "response". */
  type: string = "request";
  id: string = "";
  timestamp: string = "";
  correlationId: string = "";
  listener: string = "";
  route: string = "";
  address: string = "";
  tenant: string = "";
  principal: string = "";
  priority: string = "normal";
  retryCount: i32 = 0;
  method: string = "";
  path: string = "";
  status: i32 = 0;
  /** Header names and values (lower-case names; pseudo-headers and metadata apart). */
  headerNames: Array<string> = new Array<string>();
  headerValues: Array<string> = new Array<string>();
  /** Metadata fields (`x-nip-meta-NAME`). */
  fieldNames: Array<string> = new Array<string>();
  fieldValues: Array<string> = new Array<string>();
  /** The body as bytes; `json` holds it parsed when the content type says JSON. */
  body: ArrayBuffer = new ArrayBuffer(0);
  json: JSONValue | null = null;

  header(name: string): string | null {
    let key = name.toLowerCase();
    for (let i = 0; i < this.headerNames.length; i++) {
      if (this.headerNames[i] == key) return this.headerValues[i];
    }
    return null;
  }

  setHeader(name: string, value: string): void {
    let key = name.toLowerCase();
    for (let i = 0; i < this.headerNames.length; i++) {
      if (this.headerNames[i] == key) {
        this.headerValues[i] = value;
        return;
      }
    }
    this.headerNames.push(key);
    this.headerValues.push(value);
  }

  removeHeader(name: string): void {
    let key = name.toLowerCase();
    for (let i = 0; i < this.headerNames.length; i++) {
      if (this.headerNames[i] == key) {
        this.headerNames.splice(i, 1);
        this.headerValues.splice(i, 1);
        return;
      }
    }
  }

  field(name: string): string | null {
    for (let i = 0; i < this.fieldNames.length; i++) {
      if (this.fieldNames[i] == name) return this.fieldValues[i];
    }
    return null;
  }

  /** Sets a metadata field. */
  stamp(name: string, value: string): void {
    let key = name.toLowerCase();
    for (let i = 0; i < this.fieldNames.length; i++) {
      if (this.fieldNames[i] == key) {
        this.fieldValues[i] = value;
        return;
      }
    }
    this.fieldNames.push(key);
    this.fieldValues.push(value);
  }

  copy(): Message {
    let m = new Message();
    m.type = this.type; m.id = this.id; m.priority = this.priority;
    m.method = this.method; m.path = this.path; m.status = this.status;
    m.headerNames = this.headerNames.slice(0); m.headerValues = this.headerValues.slice(0);
    m.fieldNames = this.fieldNames.slice(0); m.fieldValues = this.fieldValues.slice(0);
    m.body = this.body;
    return m;
  }
}

/** A cluster's answer to `Context.httpCall`. */
export class HttpResponse {
  status: i32 = 0;
  body: ArrayBuffer = new ArrayBuffer(0);
  text(): string {
    return String.UTF8.decode(this.body);
  }
}

/** What a handler decided. */
export class Outcome {
  kind: i32 = 0; // 0 next, 1 reply, 2 pending (an HTTP call)
  message: Message | null = null;
  status: i32 = 200;
  body: string = "";
  contentType: string = "text/plain";

  /** Let the message go on, as changed. */
  static next(message: Message): Outcome {
    let o = new Outcome();
    o.message = message;
    return o;
  }

  /** Answer the client instead. */
  static reply(status: i32, body: string, contentType: string): Outcome {
    let o = new Outcome();
    o.kind = 1;
    o.status = status;
    o.body = body;
    o.contentType = contentType;
    return o;
  }

  /** Fail: the client gets `status` and the message. */
  static error(status: i32, message: string): Outcome {
    log(LogLevelValues.warn, message);
    return Outcome.reply(status, message + "\n", "text/plain");
  }
}

/** What a handler reaches besides its message. */
export class Context {
  name: string = "";
  /** The plugin's configuration (JSON), or null. */
  config: JSONValue | null = null;
  stream: NipStream | null = null;

  /** Calls a cluster of the proxy (GET `path`); `then` continues with `message` and the
   * answer. Return what this returns. */
  httpCall(message: Message, cluster: string, path: string, then: (m: Message, r: HttpResponse, c: Context) => Outcome): Outcome {
    let stream = this.stream;
    if (stream == null) return Outcome.error(500, "no request to call for");
    stream.pending = message;
    let headers: Headers = [];
    headers.push(new HeaderPair(String.UTF8.encode(":method"), String.UTF8.encode("GET")));
    headers.push(new HeaderPair(String.UTF8.encode(":path"), String.UTF8.encode(path)));
    headers.push(new HeaderPair(String.UTF8.encode(":authority"), String.UTF8.encode(cluster)));
    stream.then = then;
    let root = stream.root_context;
    root.httpCall(cluster, headers, new ArrayBuffer(0), [], 1000, stream, onCallResponse);
    let o = new Outcome();
    o.kind = 2;
    return o;
  }
}

/** A NIP plugin: `new Plugin("name").onMessage(handle).run()`. */
export class Plugin {
  name: string;
  pluginVersion: string = "";
  pluginAuthor: string = "";
  capabilities: Array<string> = new Array<string>();
  handleResponses: bool = false;
  handler: (m: Message, c: Context) => Outcome = passThrough;
  health: () => string = healthy;

  constructor(name: string) {
    this.name = name;
  }
  version(v: string): Plugin { this.pluginVersion = v; return this; }
  author(a: string): Plugin { this.pluginAuthor = a; return this; }
  capability(c: string): Plugin { this.capabilities.push(c); return this; }
  responses(on: bool): Plugin { this.handleResponses = on; return this; }
  onMessage(h: (m: Message, c: Context) => Outcome): Plugin { this.handler = h; return this; }
  /** Reports health as JSON (`{"healthy":true}` when not set). */
  healthCheck(h: () => string): Plugin { this.health = h; return this; }

  declaration(): string {
    let caps = "";
    for (let i = 0; i < this.capabilities.length; i++) {
      if (i > 0) caps += ",";
      caps += JSONValue.str(this.capabilities[i]).toString();
    }
    return "{\"api\":" + JSONValue.str(API_VERSION).toString() +
      ",\"sdk\":\"assemblyscript\",\"name\":" + JSONValue.str(this.name).toString() +
      ",\"version\":" + JSONValue.str(this.pluginVersion).toString() +
      ",\"author\":" + JSONValue.str(this.pluginAuthor).toString() +
      ",\"capabilities\":[" + caps + "]}";
  }

  /** Hands the plugin to the host. */
  run(): void {
    PLUGIN = this;
    registerRootContext((id: u32): RootContext => new NipRoot(id), "");
  }
}

function passThrough(m: Message, c: Context): Outcome { return Outcome.next(m); }
function healthy(): string { return "{\"healthy\":true}"; }

let PLUGIN: Plugin | null = null;
let ROOT: NipRoot | null = null;

/** The host asked for a report (1 health, 2 resource usage). */
export function report(functionId: u32): void {
  let plugin = PLUGIN;
  if (plugin == null) return;
  // (No managed values in ternaries: AssemblyScript 0.14 miscounts their references.)
  let answer = "{}";
  if (functionId == 1) answer = plugin.health();
  host.callForeign("nip_sdk_report", answer);
}

class NipRoot extends RootContext {
  config: JSONValue | null = null;

  onStart(size: usize): bool {
    let plugin = PLUGIN;
    if (plugin != null) host.callForeign("nip_sdk_declare", plugin.declaration());
    ROOT = this;
    return true;
  }

  // proxy-runtime 0.1.8's own onConfigure misreads the configuration; read it here.
  onConfigure(size: u32): bool {
    let raw = String.UTF8.decode(host.buffer(host.BUFFER_PLUGIN_CONFIGURATION, size));
    if (raw.trim().length == 0) {
      this.config = null;
      return true;
    }
    let parsed = parse(raw);
    if (parsed == null) {
      log(LogLevelValues.error, "the plugin configuration is not JSON");
      return false;
    }
    this.config = parsed;
    return true;
  }

  createContext(id: u32): StreamBase {
    return new NipStream(id, this);
  }
}

/** The answer to a stream's HTTP call: continue its handler. */
function onCallResponse(origin: StreamBase, headers: u32, bodySize: usize, trailers: u32): void {
  let stream = changetype<NipStream>(origin);
  let response = new HttpResponse();
  let status = stream_context.headers.http_callback.get(":status");
  response.status = status.length > 0 ? I32.parseInt(status) : 0;
  response.body = host.buffer(host.BUFFER_CALL_RESPONSE_BODY, <u32>bodySize);
  let message = stream.pending;
  if (message == null) return;
  let outcome: Outcome;
  if (response.status == 0) outcome = Outcome.error(503, "the HTTP call got no answer");
  else outcome = stream.then(message!, response, stream.context());
  if (stream.finish(outcome)) {
    if (stream.started == 1) continue_request(); else continue_response();
  }
}

export class NipStream extends StreamBase {
  started: i32 = 0;      // 1 request, 2 response
  bodySize: u32 = 0;
  original: Message | null = null;
  pending: Message | null = null;
  then: (m: Message, r: HttpResponse, c: Context) => Outcome = noContinuation;

  constructor(id: u32, root: NipRoot) {
    super(id, root);
  }

  context(): Context {
    let c = new Context();
    let plugin = PLUGIN;
    if (plugin != null) c.name = plugin.name;
    c.config = changetype<NipRoot>(this.root_context).config;
    c.stream = this;
    return c;
  }

  onRequestHeaders(headers: u32, end: bool): FilterHeadersStatusValues {
    if (!end) return FilterHeadersStatusValues.StopIteration; // until the body's end
    return this.start(1, 0) ? FilterHeadersStatusValues.Continue : FilterHeadersStatusValues.StopIteration;
  }

  onRequestBody(size: usize, end: bool): FilterDataStatusValues {
    if (this.started != 0) return FilterDataStatusValues.Continue;
    if (!end) return FilterDataStatusValues.StopIterationAndBuffer;
    return this.start(1, <u32>size) ? FilterDataStatusValues.Continue : FilterDataStatusValues.StopIterationAndBuffer;
  }

  onResponseHeaders(headers: u32, end: bool): FilterHeadersStatusValues {
    let plugin = PLUGIN;
    if (plugin == null || !plugin.handleResponses) return FilterHeadersStatusValues.Continue;
    if (!end) return FilterHeadersStatusValues.StopIteration;
    return this.start(2, 0) ? FilterHeadersStatusValues.Continue : FilterHeadersStatusValues.StopIteration;
  }

  onResponseBody(size: usize, end: bool): FilterDataStatusValues {
    let plugin = PLUGIN;
    if (plugin == null || !plugin.handleResponses || this.started == 2) return FilterDataStatusValues.Continue;
    if (!end) return FilterDataStatusValues.StopIterationAndBuffer;
    return this.start(2, <u32>size) ? FilterDataStatusValues.Continue : FilterDataStatusValues.StopIterationAndBuffer;
  }

  /** Makes the message and runs the handler; true when the stream goes on now. */
  start(kind: i32, bodySize: u32): bool {
    let plugin = PLUGIN;
    if (plugin == null) return true;
    this.started = kind;
    this.bodySize = bodySize;
    let message = readMessage(kind, bodySize);
    this.original = message.copy();
    if (message.json != null) this.original!.body = String.UTF8.encode(message.json!.toString());
    return this.finish(plugin.handler(message, this.context()));
  }

  /** Applies an outcome; true when the stream goes on (not answered, not waiting). */
  finish(outcome: Outcome): bool {
    if (outcome.kind == 2) {
      return false; // waiting for an HTTP call; the continuation has the message
    }
    if (outcome.kind == 1) {
      let headers: Headers = [];
      headers.push(new HeaderPair(String.UTF8.encode("content-type"), String.UTF8.encode(outcome.contentType)));
      send_local_response(<u32>outcome.status, "", String.UTF8.encode(outcome.body), headers, GrpcStatusValues.Ok);
      return false;
    }
    let message = outcome.message;
    let original = this.original;
    if (message != null && original != null) apply(this.started, original, message, this.bodySize);
    return true;
  }
}

function noContinuation(m: Message, r: HttpResponse, c: Context): Outcome {
  return Outcome.next(m);
}

function orElse(value: string | null, fallback: string): string {
  if (value == null) return fallback;
  return value!;
}

function readMessage(kind: i32, bodySize: u32): Message {
  let m = new Message();
  m.type = kind == 1 ? "request" : "response";
  let pairs: Headers;
  if (kind == 1) pairs = stream_context.headers.request.get_headers();
  else pairs = stream_context.headers.response.get_headers();
  for (let i = 0; i < pairs.length; i++) {
    let name = String.UTF8.decode(pairs[i].key).toLowerCase();
    let value = String.UTF8.decode(pairs[i].value);
    if (name.startsWith(":")) {
      if (name == ":method") m.method = value;
      else if (name == ":path") m.path = value;
      else if (name == ":status") m.status = I32.parseInt(value);
    } else if (name.startsWith(META_PREFIX)) {
      m.fieldNames.push(name.substring(META_PREFIX.length));
      m.fieldValues.push(value);
    } else {
      let existing = m.header(name);
      if (existing != null) m.setHeader(name, existing + "," + value);
      else { m.headerNames.push(name); m.headerValues.push(value); }
    }
  }
  let id = host.property(["request", "id"]);
  m.id = orElse(id, "");
  let traceparent = stream_context.headers.request.get("traceparent");
  let parts = traceparent.split("-");
  m.correlationId = m.id;
  if (parts.length == 4 && parts[1].length == 32) m.correlationId = parts[1];
  let listener = host.property(["listener_name"]);
  m.listener = orElse(listener, "");
  let route = host.property(["route_name"]);
  m.route = orElse(route, "");
  let address = host.property(["source", "address"]);
  m.address = orElse(address, "");
  let tenant = host.property(["nip", "tenant"]);
  m.tenant = orElse(tenant, "");
  let principal = host.property(["nip", "principal"]);
  m.principal = orElse(principal, "");
  let priority = host.property(["nip", "priority"]);
  m.priority = orElse(priority, "normal");
  let retries = stream_context.headers.request.get("x-nip-retry-count");
  m.retryCount = retries.length > 0 ? I32.parseInt(retries) : 0;
  if (bodySize > 0) {
    m.body = host.buffer(kind == 1 ? host.BUFFER_REQUEST_BODY : host.BUFFER_RESPONSE_BODY, bodySize);
    let type = orElse(m.header("content-type"), "");
    if (type.length > 0) {
      let essence = type.split(";")[0].trim().toLowerCase();
      if (essence == "application/json" || essence.endsWith("+json")) {
        m.json = parse(String.UTF8.decode(m.body));
      }
    }
  }
  return m;
}

function setHeader(request: bool, name: string, value: string): void {
  if (request) stream_context.headers.request.replace(name, value);
  else stream_context.headers.response.replace(name, value);
}

function removeHeader(request: bool, name: string): void {
  if (request) stream_context.headers.request.remove(name);
  else stream_context.headers.response.remove(name);
}

/** Writes back what the handler changed. */
function apply(kind: i32, original: Message, changed: Message, bodySize: u32): void {
  let request = kind == 1;
  for (let i = 0; i < changed.headerNames.length; i++) {
    let before = original.header(changed.headerNames[i]);
    if (before == null || before != changed.headerValues[i]) setHeader(request, changed.headerNames[i], changed.headerValues[i]);
  }
  for (let i = 0; i < original.headerNames.length; i++) {
    if (changed.header(original.headerNames[i]) == null) removeHeader(request, original.headerNames[i]);
  }
  for (let i = 0; i < changed.fieldNames.length; i++) {
    let before = original.field(changed.fieldNames[i]);
    if (before == null || before != changed.fieldValues[i]) setHeader(request, META_PREFIX + changed.fieldNames[i], changed.fieldValues[i]);
  }
  if (changed.priority != original.priority) setHeader(request, "x-nip-priority", changed.priority);
  if (kind == 1 && changed.path != original.path && changed.path.length > 0) setHeader(request, ":path", changed.path);
  if (kind == 2 && changed.status != original.status && changed.status > 0) setHeader(request, ":status", changed.status.toString());
  let body = changed.body;
  let json = changed.json;
  if (json != null) body = String.UTF8.encode(json!.toString());
  if (bodySize > 0 && String.UTF8.decode(body) != String.UTF8.decode(original.body)) {
    host.setBuffer(kind == 1 ? host.BUFFER_REQUEST_BODY : host.BUFFER_RESPONSE_BODY, bodySize, body);
    if (changed.header("content-length") != null) setHeader(request, "content-length", body.byteLength.toString());
  }
}
