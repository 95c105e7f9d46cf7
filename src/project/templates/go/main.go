// {{name}}: a NIP plugin on the Go SDK (nip/nipplugin, vendored in ./nip-plugin), run as a
// process of its own that the proxy asks over Envoy's ext_proc. Requests under /private
// are refused here; every other request goes upstream with an `x-hello` header. `nip dev`
// rebuilds and restarts it when you save; `nip test --integration` checks cases.yaml.
package main

import (
	"strings"

	"nip/nipplugin"
)

func handle(ctx *nipplugin.Context, m *nipplugin.Message) (*nipplugin.Reply, error) {
	if strings.HasPrefix(m.Path, "/private") {
		return nipplugin.Text(403, "private\n"), nil
	}
	m.SetHeader("x-hello", "{{name}}")
	return nil, nil
}

func main() {
	nipplugin.New("{{name}}").
		Version("0.1.0").
		Capability("local_reply").
		OnMessage(handle).
		Run()
}
