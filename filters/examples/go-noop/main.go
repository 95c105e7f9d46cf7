// A Go SDK process plugin that changes nothing: the cost of a message handled out of
// process (bench/plugin_sdk.py).
package main

import "nip/nipplugin"

func main() {
	nipplugin.New("go-noop").Version("1.0.0").Run()
}
