"""{{name}}: a NIP plugin on the Python SDK (nip_plugin, vendored in ./nip-plugin), run
as a process of its own that the proxy asks over Envoy's ext_proc. Requests under
/private are refused here; every other request goes upstream with an ``x-hello`` header.
``nip dev`` restarts it when you save; ``nip test --integration`` checks cases.yaml.
Needs ``pip install grpcio xds-protos protobuf``.
"""

from nip_plugin import Plugin, Reply

plugin = Plugin("{{name}}", version="0.1.0", capabilities=["local_reply"])


@plugin.on_message
async def handle(message, ctx):
    if (message.path or "").startswith("/private"):
        return Reply.text(403, "private\n")
    message.set_header("x-hello", "{{name}}")
    return message


if __name__ == "__main__":
    plugin.run()
