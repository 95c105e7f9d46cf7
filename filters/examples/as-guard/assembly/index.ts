// The SDK examples' common behaviour (filters/examples/sdk-guard, the same in every
// language, driven by the same tests) on the TypeScript (AssemblyScript) SDK:
// low priority gets 503; `x-user` is looked up in `lookup_cluster` (tier upstream as
// x-user-tier, unknown user 403, failing lookup 502); requests are stamped checked-by,
// tenant and principal; JSON responses have the `redact` fields replaced.
export * from "../../../sdk/assemblyscript/assembly/abi";
import {
  Plugin, Message, Context, Outcome, HttpResponse, JSONValue, parse, OBJECT, ARRAY, STRING,
} from "../../../sdk/assemblyscript/assembly/index";

function stampAndGo(message: Message, ctx: Context): Outcome {
  message.stamp("checked-by", ctx.name);
  if (message.tenant.length > 0) message.stamp("tenant", message.tenant);
  if (message.principal.length > 0) message.stamp("principal", message.principal);
  return Outcome.next(message);
}

function afterLookup(message: Message, answer: HttpResponse, ctx: Context): Outcome {
  let user = message.header("x-user");
  let name = "";
  if (user != null) name = user!;
  if (answer.status == 404) return Outcome.error(403, "unknown user " + name);
  if (answer.status != 200) return Outcome.error(502, "user lookup answered " + answer.status.toString());
  // (No managed values in ternaries: AssemblyScript 0.14 miscounts their references.)
  let tier = "unknown";
  let found = parse(answer.text());
  if (found != null) {
    let value = found!.get("tier");
    if (value != null) tier = value!.text;
  }
  message.setHeader("x-user-tier", tier);
  return stampAndGo(message, ctx);
}

function redact(value: JSONValue, fields: JSONValue): i32 {
  let count = 0;
  if (value.kind == OBJECT) {
    for (let i = 0; i < value.keys.length; i++) {
      let hit = false;
      for (let j = 0; j < fields.items.length; j++) {
        if (fields.items[j].text == value.keys[i]) hit = true;
      }
      if (hit) {
        value.items[i] = JSONValue.str("[redacted]");
        count++;
      } else {
        count += redact(value.items[i], fields);
      }
    }
  } else if (value.kind == ARRAY) {
    for (let i = 0; i < value.items.length; i++) count += redact(value.items[i], fields);
  }
  return count;
}

function handle(message: Message, ctx: Context): Outcome {
  let config = ctx.config;
  if (message.type == "request") {
    if (message.priority == "low") {
      return Outcome.reply(503, "{\"error\":\"low priority requests are not served on this route\"}", "application/json");
    }
    let user = message.header("x-user");
    if (user != null && config != null) {
      let cluster = config!.get("lookup_cluster");
      if (cluster != null && cluster!.kind == STRING) {
        return ctx.httpCall(message, cluster!.text, "/users/" + user!, afterLookup);
      }
    }
    return stampAndGo(message, ctx);
  }
  let json = message.json;
  if (json != null && config != null) {
    let fields = config!.get("redact");
    if (fields != null && fields!.kind == ARRAY) redact(json!, fields!);
  }
  return Outcome.next(message);
}

new Plugin("sdk-guard")
  .version("1.0.0")
  .author("NIP")
  .capability("local_reply")
  .capability("http_calls")
  .capability("modify_body")
  .responses(true)
  .onMessage(handle)
  .run();
