"""The SDK examples' common behaviour (filters/examples/sdk-guard, the same in every
language, driven by the same tests) on the Python SDK, as a process plugin:

* a request of priority ``low`` gets 503 and a JSON error;
* with ``lookup_url`` set, a request with ``x-user`` is looked up there
  (``GET /users/NAME``): the answer's ``tier`` goes upstream as ``x-user-tier``, an
  unknown user gets 403 and a failing lookup 502;
* every request is stamped ``checked-by`` (and ``tenant``, ``principal`` when known);
* JSON responses have the fields named in ``redact`` replaced by ``"[redacted]"``.

Config (JSON, the plugin's ``config``): ``{"redact": ["card"], "lookup_url": "http://…"}``.
Run: ``python3 guard.py PORT`` with ``filters/sdk/python`` importable.
"""

from nip_plugin import Plugin, PluginError, Reply

plugin = Plugin(
    "sdk-guard",
    version="1.0.0",
    author="NIP",
    capabilities=["local_reply", "http_calls", "modify_body"],
)


HANDLED = {"messages": 0}


@plugin.health_check
def health():
    return {"healthy": True}


@plugin.resource_usage
def usage():
    return dict(HANDLED)


@plugin.on_config_change
def check(config):
    if any(not field for field in (config or {}).get("redact", [])):
        raise ValueError("redact: a field name is empty")


def redact(value, fields):
    if isinstance(value, dict):
        count = 0
        for key in value:
            if key in fields:
                value[key] = "[redacted]"
                count += 1
            else:
                count += redact(value[key], fields)
        return count
    if isinstance(value, list):
        return sum(redact(item, fields) for item in value)
    return 0


@plugin.on_message
async def handle(message, ctx):
    HANDLED["messages"] += 1
    config = ctx.config or {}
    if message.type == "request":
        if message.metadata.priority == "low":
            return Reply.json(503, {"error": "low priority requests are not served on this route"})
        user = message.header("x-user")
        if user and config.get("lookup_url"):
            answer = await ctx.http_call(f"{config['lookup_url']}/users/{user}")
            if answer.status == 200:
                message.set_header("x-user-tier", answer.json().get("tier", "unknown"))
            elif answer.status == 404:
                raise PluginError(f"unknown user {user}", 403)
            else:
                raise PluginError(f"user lookup answered {answer.status}", 502)
        message.stamp("checked-by", ctx.name)
        if message.tenant:
            message.stamp("tenant", message.tenant)
        if message.principal:
            message.stamp("principal", message.principal)
        return message
    if message.data.is_json():
        redact(message.data.json, set(config.get("redact", [])))
    return message


if __name__ == "__main__":
    plugin.run()
