// The proxy-wasm entry points of a plugin built with the SDK: re-export these from the
// plugin's own entry file (`export * from ".../assembly/abi"`). They are
// @solo-io/proxy-runtime's, except proxy_on_foreign_function (a no-op there), which
// answers the host's health and resource-usage requests.
export * from "@solo-io/proxy-runtime/malloc";
export {
  proxy_abi_version_0_2_0, proxy_on_vm_start, proxy_validate_configuration, proxy_on_configure,
  proxy_on_tick, proxy_on_queue_ready, proxy_on_context_create, proxy_on_request_headers,
  proxy_on_request_body, proxy_on_request_trailers, proxy_on_request_metadata,
  proxy_on_response_headers, proxy_on_response_body, proxy_on_response_trailers,
  proxy_on_response_metadata, proxy_on_http_call_response, proxy_on_grpc_receive_initial_metadata,
  proxy_on_grpc_trailing_metadata, proxy_on_grpc_receive, proxy_on_grpc_close, proxy_on_done,
  proxy_on_log, proxy_on_delete,
} from "@solo-io/proxy-runtime/exports";
import { report } from "./index";

export function proxy_on_foreign_function(root_context_id: u32, function_id: u32, data_size: u32): void {
  report(function_id);
}
