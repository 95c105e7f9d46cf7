/*
 * A proxy-wasm plugin in plain C, against the raw ABI 0.2.1 (no SDK): proof that any
 * language that targets wasm32 can extend NIP.
 *
 * - Requests carrying the header named in the plugin config (default `x-block`) are
 *   answered 403 by the plugin; the upstream never sees them.
 * - Every other request gets `x-c-plugin: <that header name>` on its way upstream, and
 *   every response `x-plugin-language: c`.
 *
 * Build (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32):
 *   ./build.sh out.wasm
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

enum { OK = 0, NOT_FOUND = 1 };
enum { REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2 };
enum { PLUGIN_CONFIGURATION = 7 };
enum { LOG_INFO = 2, LOG_ERROR = 4 };
enum { CONTINUE = 0, PAUSE = 1 };

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *message, size_t len);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t kind, size_t start, size_t max, char **data, size_t *len);
IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(int32_t map, const char *key, size_t key_len, char **value,
                                   size_t *value_len);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t map, const char *key, size_t key_len,
                                   const char *value, size_t value_len);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(int32_t status, const char *details, size_t details_len,
                                  const char *body, size_t body_len, const char *headers,
                                  size_t headers_len, int32_t grpc_status);

/* The header that blocks a request, from the plugin config. */
static char block_header[128] = "x-block";

static void log_text(int32_t level, const char *text) { proxy_log(level, text, strlen(text)); }

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

/* The host hands strings back in memory the plugin allocates. */
EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) {
    return malloc(size ? size : 1);
}

EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context, uint32_t parent) {
    (void)context;
    (void)parent;
}

EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root, size_t size) {
    (void)root;
    if (size == 0) {
        return 1;
    }
    char *config = NULL;
    size_t len = 0;
    if (proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &config, &len) != OK) {
        return 0;
    }
    if (len == 0 || len >= sizeof block_header) {
        log_text(LOG_ERROR, "config must be a header name of 1 to 127 bytes");
        free(config);
        return 0;
    }
    memcpy(block_header, config, len);
    block_header[len] = '\0';
    free(config);
    log_text(LOG_INFO, "c-deny configured");
    return 1;
}

EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context, uint32_t headers, uint32_t end_of_stream) {
    (void)context;
    (void)headers;
    (void)end_of_stream;
    char *value = NULL;
    size_t value_len = 0;
    int32_t found = proxy_get_header_map_value(REQUEST_HEADERS, block_header, strlen(block_header),
                                               &value, &value_len);
    if (found == OK) {
        free(value);
        /* One extra response header, in the ABI's header-map wire format. */
        static const char name[] = "x-blocked-by";
        static const char val[] = "c-deny";
        char map[4 + 8 + sizeof name + sizeof val];
        uint32_t count = 1, name_len = sizeof name - 1, val_len = sizeof val - 1;
        memcpy(map, &count, 4);
        memcpy(map + 4, &name_len, 4);
        memcpy(map + 8, &val_len, 4);
        memcpy(map + 12, name, sizeof name);
        memcpy(map + 12 + sizeof name, val, sizeof val);
        static const char body[] = "blocked by a C plugin\n";
        proxy_send_local_response(403, "c-deny", 6, body, sizeof body - 1, map, sizeof map, -1);
        return PAUSE;
    }
    proxy_add_header_map_value(REQUEST_HEADERS, "x-c-plugin", 10, block_header,
                               strlen(block_header));
    return CONTINUE;
}

EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context, uint32_t headers, uint32_t end_of_stream) {
    (void)context;
    (void)headers;
    (void)end_of_stream;
    proxy_add_header_map_value(RESPONSE_HEADERS, "x-plugin-language", 17, "c", 1);
    return CONTINUE;
}
