"""A Python SDK process plugin that changes nothing: the cost of a message handled out of
process (bench/plugin_sdk.py). Run: python3 noop.py PORT with filters/sdk/python importable."""

from nip_plugin import Plugin

plugin = Plugin("python-noop", version="1.0.0")


@plugin.on_message
async def handle(message, ctx):
    return message


if __name__ == "__main__":
    plugin.run()
