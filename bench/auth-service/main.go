// nginx's side of the process-plugin bench in Go: the service nginx's auth_request asks
// for every request, answering 200 with nothing to say. Usage: auth-service PORT
package main

import (
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(200) })
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		panic(err)
	}
}
