// {{name}}: a NIP plugin on the TypeScript (AssemblyScript) SDK, vendored in ./nip-plugin.
// Requests under /private are refused here; every other request goes upstream with an
// `x-hello` header. `nip dev` rebuilds and reloads it when you save; `nip test
// --integration` checks cases.yaml against it.
export * from "../nip-plugin/assembly/abi";
import { Plugin, Message, Context, Outcome } from "../nip-plugin/assembly/index";

function handle(message: Message, ctx: Context): Outcome {
  if (message.path.startsWith("/private")) return Outcome.reply(403, "private\n", "text/plain");
  message.setHeader("x-hello", "{{name}}");
  return Outcome.next(message);
}

new Plugin("{{name}}")
  .version("0.1.0")
  .capability("local_reply")
  .onMessage(handle)
  .run();
