"""NIP Plugin SDK v2 for Python.

A plugin is a message handler in a process of its own; the proxy hands it each request
(and response) over Envoy's external processing protocol (``ext_proc``), as the message
``filters/sdk/MESSAGE.md`` defines::

    from nip_plugin import Plugin, Reply

    plugin = Plugin("greeter", version="1.0.0")

    @plugin.on_message
    async def handle(message, ctx):
        if message.metadata.priority == "low":
            return Reply.text(503, "busy")
        message.stamp("greeted", "yes")
        return message

    if __name__ == "__main__":
        plugin.run()          # port from argv[1], else NIP_PLUGIN_PORT, else 9000

The proxy side is a plugin with ``isolation: process`` whose ``process.service`` is where
this process listens. The plugin's ``config`` arrives with every request stream
(``x-nip-plugin-config``): ``ctx.config`` is the parsed JSON, and a changed config is
checked by ``on_config_change`` and used from the next request, without a restart.
"""

from .message import Data, Message, Metadata, Reply, Source, PluginError
from .plugin import Context, HttpResponse, Plugin

API_VERSION = "2.0"

__all__ = [
    "API_VERSION",
    "Context",
    "Data",
    "HttpResponse",
    "Message",
    "Metadata",
    "Plugin",
    "PluginError",
    "Reply",
    "Source",
]
