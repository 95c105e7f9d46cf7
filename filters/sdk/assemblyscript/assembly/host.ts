import { free } from "@solo-io/proxy-runtime/malloc";

// The host calls the SDK makes itself: @solo-io/proxy-runtime 0.1.8 aborts the VM when a
// property is missing, binds its "set buffer" to the wrong import and has no foreign
// function call, so these go straight to the ABI.

// @ts-ignore: decorator
@external("env", "proxy_get_property")
declare function proxy_get_property(path: usize, path_size: usize, result: usize, result_size: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: u32, start: u32, length: u32, data: usize, size: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_call_foreign_function")
declare function proxy_call_foreign_function(name: usize, name_size: usize, args: usize, args_size: usize, result: usize, result_size: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_buffer_bytes")
declare function proxy_get_buffer_bytes(typ: u32, start: u32, length: u32, result: usize, result_size: usize): u32;

/** Buffer types of the ABI. */
export const BUFFER_REQUEST_BODY: u32 = 0;
export const BUFFER_RESPONSE_BODY: u32 = 1;
export const BUFFER_CALL_RESPONSE_BODY: u32 = 4;
export const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

/** Where the host writes the address and size of what it hands over. */
class Out {
  ptr: usize = 0;
  size: usize = 0;
}
let OUT = new Out();

function outPtr(): usize {
  OUT.ptr = 0;
  OUT.size = 0;
  return changetype<usize>(OUT) + offsetof<Out>("ptr");
}

function outSize(): usize {
  return changetype<usize>(OUT) + offsetof<Out>("size");
}

/** Bytes the host handed over: an ArrayBuffer it allocated through the runtime's malloc
 * (retained once for the host; released here, as the runtime itself does). */
function taken(): ArrayBuffer {
  if (OUT.ptr == 0 || OUT.size == 0) return new ArrayBuffer(0);
  let array = changetype<ArrayBuffer>(OUT.ptr);
  free(OUT.ptr);
  return array;
}

/** A property as text; null when the host has none. */
export function property(path: Array<string>): string | null {
  let key = String.UTF8.encode(path.join("\0"));
  let ptr = outPtr();
  if (proxy_get_property(changetype<usize>(key), key.byteLength, ptr, outSize()) != 0) return null;
  let value = String.UTF8.decode(taken());
  if (value.length == 0) return null;
  return value;
}

/** Bytes of a buffer. */
export function buffer(typ: u32, size: u32): ArrayBuffer {
  if (size == 0) return new ArrayBuffer(0);
  let ptr = outPtr();
  if (proxy_get_buffer_bytes(typ, 0, size, ptr, outSize()) != 0) return new ArrayBuffer(0);
  return taken();
}

/** Replaces the first `length` bytes of a buffer (the whole body) with `data`. */
export function setBuffer(typ: u32, length: u32, data: ArrayBuffer): void {
  proxy_set_buffer_bytes(typ, 0, length, changetype<usize>(data), data.byteLength);
}

/** Calls a host foreign function; false when the host has none of that name. */
export function callForeign(name: string, args: string): bool {
  let n = String.UTF8.encode(name);
  let a = String.UTF8.encode(args);
  let ptr = outPtr();
  let ok = proxy_call_foreign_function(changetype<usize>(n), n.byteLength, changetype<usize>(a), a.byteLength, ptr, outSize()) == 0;
  taken(); // release what the host returned
  return ok;
}
