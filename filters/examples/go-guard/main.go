// The SDK examples' common behaviour (filters/examples/sdk-guard, the same in every
// language, driven by the same tests) on the Go SDK, as a process plugin: low priority
// gets 503; x-user is looked up at lookup_url (tier upstream as x-user-tier, unknown
// user 403, failing lookup 502); requests are stamped checked-by, tenant and principal;
// JSON responses have the `redact` fields replaced.
package main

import (
	"encoding/json"
	"errors"

	"nip/nipplugin"
)

func redact(value interface{}, fields map[string]bool) int {
	count := 0
	switch v := value.(type) {
	case map[string]interface{}:
		for key, item := range v {
			if fields[key] {
				v[key] = "[redacted]"
				count++
			} else {
				count += redact(item, fields)
			}
		}
	case []interface{}:
		for _, item := range v {
			count += redact(item, fields)
		}
	}
	return count
}

func handle(ctx *nipplugin.Context, m *nipplugin.Message) (*nipplugin.Reply, error) {
	if m.Type == "request" {
		if m.Metadata.Priority == "low" {
			return nipplugin.JSONReply(503, map[string]string{"error": "low priority requests are not served on this route"}), nil
		}
		url, _ := ctx.Config["lookup_url"].(string)
		if user := m.Header("x-user"); user != "" && url != "" {
			answer, err := ctx.HTTPGet(url + "/users/" + user)
			if err != nil {
				return nil, err
			}
			switch answer.Status {
			case 200:
				var found struct{ Tier string }
				if json.Unmarshal(answer.Body, &found) != nil || found.Tier == "" {
					found.Tier = "unknown"
				}
				m.SetHeader("x-user-tier", found.Tier)
			case 404:
				return nil, nipplugin.Fail(403, "unknown user %s", user)
			default:
				return nil, nipplugin.Fail(502, "user lookup answered %d", answer.Status)
			}
		}
		m.Stamp("checked-by", ctx.Plugin.Name)
		if m.Tenant != "" {
			m.Stamp("tenant", m.Tenant)
		}
		if m.Principal != "" {
			m.Stamp("principal", m.Principal)
		}
		return nil, nil
	}
	fields := map[string]bool{}
	list, _ := ctx.Config["redact"].([]interface{})
	for _, f := range list {
		if name, ok := f.(string); ok {
			fields[name] = true
		}
	}
	if m.JSON != nil {
		redact(m.JSON, fields)
	}
	return nil, nil
}

func main() {
	nipplugin.New("sdk-guard").
		Version("1.0.0").
		Author("NIP").
		Capability("local_reply").
		Capability("http_calls").
		Capability("modify_body").
		OnConfigChange(func(config map[string]interface{}) error {
			list, _ := config["redact"].([]interface{})
			for _, f := range list {
				if name, _ := f.(string); name == "" {
					return errors.New("redact: a field name is empty")
				}
			}
			return nil
		}).
		OnMessage(handle).
		Run()
}
