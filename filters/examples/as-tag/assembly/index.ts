// A proxy-wasm plugin in AssemblyScript, on the public @solo-io/proxy-runtime SDK.
// Adds `x-plugin-language: assemblyscript` to responses and, on requests, the header
// the plugin config names (default `x-as-plugin: yes`, config `name=value`).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class TagRoot extends RootContext {
  tag: string = "";

  // The SDK's own onConfigure (0.1.8) passes the size where the host expects a pointer, so
  // the configuration never arrives; read it with the SDK's buffer call instead.
  onConfigure(configuration_size: u32): bool {
    const bytes = get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size);
    this.tag = String.UTF8.decode(bytes);
    return true;
  }

  createContext(context_id: u32): Context {
    return new Tag(context_id, this);
  }
}

class Tag extends Context {
  constructor(context_id: u32, root_context: TagRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const config = (this.root_context as TagRoot).tag;
    const eq = config.indexOf("=");
    if (eq > 0) {
      stream_context.headers.request.add(config.substring(0, eq), config.substring(eq + 1));
    } else {
      stream_context.headers.request.add("x-as-plugin", "yes");
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-plugin-language", "assemblyscript");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new TagRoot(context_id);
}, "");
