// Package nipplugin is NIP's Plugin SDK v2 for Go: a plugin is a message handler in a
// process of its own, which the proxy asks over Envoy's external processing protocol
// (ext_proc), as filters/sdk/MESSAGE.md defines the message.
//
//	p := nipplugin.New("greeter").Version("1.0.0")
//	p.OnMessage(func(ctx *nipplugin.Context, m *nipplugin.Message) (*nipplugin.Reply, error) {
//		if m.Metadata.Priority == "low" {
//			return nipplugin.Text(503, "busy"), nil
//		}
//		m.Stamp("greeted", "yes")
//		return nil, nil // go on with m as changed
//	})
//	p.Run() // port from os.Args[1], else NIP_PLUGIN_PORT
//
// No generated Go code: messages are read through the descriptors of Envoy's protos
// (ext_proc.pb, made by ../gen.sh from the files the project already builds with), as
// dynamic messages in their proto3 JSON form.
package nipplugin

import (
	"context"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// APIVersion is the NIP plugin API this SDK speaks.
const APIVersion = "2.0"

//go:embed ext_proc.pb
var descriptorSet []byte

const (
	metaPrefix    = "x-nip-meta-"
	attributesKey = "envoy.filters.http.ext_proc"
)

// Source is where a message came from.
type Source struct{ Listener, Route, Address string }

// Metadata is what the proxy knows beyond headers and body.
type Metadata struct {
	Priority   string
	RetryCount int
	Fields     map[string]string
}

// Message is one request or response.
type Message struct {
	ID, Type, Timestamp, CorrelationID string
	Source                             Source
	// Data is the body; JSON holds it parsed when the content type says JSON.
	Data      []byte
	JSON      interface{}
	Metadata  Metadata
	Headers   map[string]string
	Tenant    string
	Principal string
	Method    string
	Path      string
	Status    int
}

// Header returns a header's value ("" when absent).
func (m *Message) Header(name string) string { return m.Headers[strings.ToLower(name)] }

// SetHeader sets a header.
func (m *Message) SetHeader(name, value string) { m.Headers[strings.ToLower(name)] = value }

// RemoveHeader removes a header.
func (m *Message) RemoveHeader(name string) { delete(m.Headers, strings.ToLower(name)) }

// Stamp sets a metadata field (an x-nip-meta-NAME header on the wire).
func (m *Message) Stamp(name, value string) { m.Metadata.Fields[strings.ToLower(name)] = value }

// Reply answers the client instead of letting the message go on.
type Reply struct {
	Status  int
	Headers map[string]string
	Body    []byte
}

// Text is a plain-text reply.
func Text(status int, body string) *Reply {
	return &Reply{status, map[string]string{"content-type": "text/plain"}, []byte(body)}
}

// JSONReply is a JSON reply.
func JSONReply(status int, value interface{}) *Reply {
	body, _ := json.Marshal(value)
	return &Reply{status, map[string]string{"content-type": "application/json"}, body}
}

// Error is a handler's failure: the client gets Status and the message.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("%s (%d)", e.Message, e.Status) }

// Fail makes an Error.
func Fail(status int, format string, args ...interface{}) error {
	return &Error{status, fmt.Sprintf(format, args...)}
}

// Context is what a handler reaches besides its message.
type Context struct {
	context.Context
	Plugin *Plugin
	// Config is the plugin's config (JSON), as sent with the request's stream.
	Config map[string]interface{}
}

// HTTPResponse is an answer to Context.HTTPGet.
type HTTPResponse struct {
	Status int
	Body   []byte
}

// HTTPGet calls a service (a process plugin reaches services itself, by URL).
func (c *Context) HTTPGet(url string) (*HTTPResponse, error) {
	client := http.Client{Timeout: time.Second}
	answer, err := client.Get(url)
	if err != nil {
		return nil, Fail(503, "the HTTP call to %s failed: %v", url, err)
	}
	defer answer.Body.Close()
	body, _ := io.ReadAll(answer.Body)
	return &HTTPResponse{answer.StatusCode, body}, nil
}

// Handler handles a message: a nil reply and error let it go on as changed.
type Handler func(ctx *Context, m *Message) (*Reply, error)

// Plugin is a NIP plugin.
type Plugin struct {
	Name, version, author string
	capabilities          []string
	handler               Handler
	configCheck           func(map[string]interface{}) error
	health                func() (bool, string)
	usage                 func() map[string]interface{}
}

// New makes a plugin.
func New(name string) *Plugin {
	return &Plugin{Name: name, handler: func(*Context, *Message) (*Reply, error) { return nil, nil }}
}

// Version sets the plugin's version.
func (p *Plugin) Version(v string) *Plugin { p.version = v; return p }

// Author sets its author.
func (p *Plugin) Author(a string) *Plugin { p.author = a; return p }

// Capability adds something it does.
func (p *Plugin) Capability(c string) *Plugin { p.capabilities = append(p.capabilities, c); return p }

// OnMessage sets the handler.
func (p *Plugin) OnMessage(h Handler) *Plugin { p.handler = h; return p }

// HealthCheck sets what the plugin says when the proxy asks how it is.
func (p *Plugin) HealthCheck(check func() (bool, string)) *Plugin { p.health = check; return p }

// ResourceUsage sets the plugin's own figures for the proxy.
func (p *Plugin) ResourceUsage(usage func() map[string]interface{}) *Plugin {
	p.usage = usage
	return p
}

func (p *Plugin) report(what string) interface{} {
	switch what {
	case "health":
		if p.health == nil {
			return map[string]interface{}{"healthy": true}
		}
		healthy, message := p.health()
		answer := map[string]interface{}{"healthy": healthy}
		if message != "" {
			answer["message"] = message
		}
		return answer
	case "resource_usage":
		if p.usage != nil {
			return p.usage()
		}
	}
	return map[string]interface{}{}
}

// OnConfigChange checks each new config; an error refuses it (the request fails).
func (p *Plugin) OnConfigChange(check func(map[string]interface{}) error) *Plugin {
	p.configCheck = check
	return p
}

// Declaration is what the plugin says about itself (printed by --describe).
func (p *Plugin) Declaration() map[string]interface{} {
	return map[string]interface{}{
		"api": APIVersion, "sdk": "go", "name": p.Name, "version": p.version,
		"author": p.author, "capabilities": append([]string{}, p.capabilities...),
	}
}

// codec marshals the dynamic messages (grpc's own wants generated ones).
type codec struct{}

func (codec) Marshal(v interface{}) ([]byte, error) {
	return proto.Marshal(v.(protoreflect.ProtoMessage))
}
func (codec) Unmarshal(data []byte, v interface{}) error {
	return proto.Unmarshal(data, v.(protoreflect.ProtoMessage))
}
func (codec) Name() string { return "proto" }

type descriptors struct {
	request, response protoreflect.MessageDescriptor
}

func loadDescriptors() (descriptors, error) {
	set := &descriptorpb.FileDescriptorSet{}
	if err := proto.Unmarshal(descriptorSet, set); err != nil {
		return descriptors{}, err
	}
	files, err := protodesc.NewFiles(set)
	if err != nil {
		return descriptors{}, err
	}
	find := func(name string) (protoreflect.MessageDescriptor, error) {
		d, err := files.FindDescriptorByName(protoreflect.FullName(name))
		if err != nil {
			return nil, err
		}
		return d.(protoreflect.MessageDescriptor), nil
	}
	req, err := find("envoy.service.ext_proc.v3.ProcessingRequest")
	if err != nil {
		return descriptors{}, err
	}
	resp, err := find("envoy.service.ext_proc.v3.ProcessingResponse")
	return descriptors{req, resp}, err
}

// Run serves the plugin until the process ends. `--describe` prints the declaration and
// returns (the proxy's version check).
func (p *Plugin) Run() {
	for _, arg := range os.Args[1:] {
		if arg == "--describe" {
			out, _ := json.Marshal(p.Declaration())
			fmt.Println(string(out))
			return
		}
	}
	port := os.Getenv("NIP_PLUGIN_PORT")
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	if port == "" {
		port = "9000"
	}
	d, err := loadDescriptors()
	if err != nil {
		log.Fatalf("%s: the ext_proc descriptors: %v", p.Name, err)
	}
	encoding.RegisterCodec(codec{})
	server := grpc.NewServer()
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "envoy.service.ext_proc.v3.ExternalProcessor",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Process",
			ServerStreams: true,
			ClientStreams: true,
			Handler: func(_ interface{}, stream grpc.ServerStream) error {
				return p.process(d, stream)
			},
		}},
	}, p)
	// The proxy's supervisor asks for health and resource usage here:
	// nip.plugin.v2.Plugin/Report(StringValue "health" | "resource_usage") -> StringValue (JSON).
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "nip.plugin.v2.Plugin",
		HandlerType: (*interface{})(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Report",
			Handler: func(_ interface{}, ctx context.Context, decode func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				in := &wrapperspb.StringValue{}
				if err := decode(in); err != nil {
					return nil, err
				}
				out, _ := json.Marshal(p.report(in.Value))
				return &wrapperspb.StringValue{Value: string(out)}, nil
			},
		}},
	}, p)
	listener, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		log.Fatalf("%s: %v", p.Name, err)
	}
	fmt.Printf("%s %s listening on 127.0.0.1:%s\n", p.Name, p.version, port)
	if err := server.Serve(listener); err != nil {
		log.Fatalf("%s: %v", p.Name, err)
	}
}

// obj is a proto3 JSON object.
type obj = map[string]interface{}

func str(v interface{}) string { s, _ := v.(string); return s }

func field(o obj, path ...string) interface{} {
	var v interface{} = o
	for _, key := range path {
		m, ok := v.(obj)
		if !ok {
			return nil
		}
		v = m[key]
	}
	return v
}

func pairs(headers interface{}) [][2]string {
	var out [][2]string
	list, _ := field(obj{"h": headers}, "h", "headers").([]interface{})
	for _, item := range list {
		h, _ := item.(obj)
		value := str(h["value"])
		if raw := str(h["rawValue"]); raw != "" {
			if decoded, err := base64.StdEncoding.DecodeString(raw); err == nil {
				value = string(decoded)
			}
		}
		out = append(out, [2]string{strings.ToLower(str(h["key"])), value})
	}
	return out
}

type exchange struct {
	request, response [][2]string
	attributes        obj
	bodyModes         [2]string
}

func (p *Plugin) process(d descriptors, stream grpc.ServerStream) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	ctx := &Context{Context: stream.Context(), Plugin: p}
	if raw := md.Get("x-nip-plugin-config"); len(raw) > 0 && strings.TrimSpace(raw[0]) != "" {
		if err := json.Unmarshal([]byte(raw[0]), &ctx.Config); err != nil {
			return status.Errorf(codes.InvalidArgument, "configuration is not JSON: %v", err)
		}
		if p.configCheck != nil {
			if err := p.configCheck(ctx.Config); err != nil {
				return status.Errorf(codes.InvalidArgument, "configuration refused: %v", err)
			}
		}
	}
	// Whole bodies until the proxy says otherwise (its first message's protocol_config).
	ex := &exchange{bodyModes: [2]string{"BUFFERED", "BUFFERED"}}
	for {
		in := dynamicpb.NewMessage(d.request)
		if err := stream.RecvMsg(in); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		text, err := protojson.Marshal(in)
		if err != nil {
			return err
		}
		var req obj
		if err := json.Unmarshal(text, &req); err != nil {
			return err
		}
		if modes, ok := req["protocolConfig"].(obj); ok {
			mode := func(name string) string {
				if m := str(modes[name]); m != "" {
					return m
				}
				return "NONE" // proto3 JSON leaves the zero value out
			}
			ex.bodyModes = [2]string{mode("requestBodyMode"), mode("responseBodyMode")}
		}
		var answer obj
		switch {
		case req["requestHeaders"] != nil:
			if attrs, ok := field(req, "attributes", attributesKey).(obj); ok {
				ex.attributes = attrs
			}
			ex.request = pairs(field(req, "requestHeaders", "headers"))
			eos, _ := field(req, "requestHeaders", "endOfStream").(bool)
			if !eos && ex.bodyModes[0] == "BUFFERED" {
				answer = obj{"requestHeaders": obj{}}
			} else {
				answer = p.handle(ctx, "request", "requestHeaders", ex, ex.request, nil)
			}
		case req["requestBody"] != nil && ex.bodyModes[0] != "BUFFERED":
			answer = obj{"requestBody": obj{}} // a chunk (STREAMED), unchanged
		case req["responseBody"] != nil && ex.bodyModes[1] != "BUFFERED":
			answer = obj{"responseBody": obj{}}
		case req["requestBody"] != nil:
			body, _ := base64.StdEncoding.DecodeString(str(field(req, "requestBody", "body")))
			answer = p.handle(ctx, "request", "requestBody", ex, ex.request, body)
		case req["responseHeaders"] != nil:
			ex.response = pairs(field(req, "responseHeaders", "headers"))
			eos, _ := field(req, "responseHeaders", "endOfStream").(bool)
			if !eos && ex.bodyModes[1] == "BUFFERED" {
				answer = obj{"responseHeaders": obj{}}
			} else {
				answer = p.handle(ctx, "response", "responseHeaders", ex, ex.response, nil)
			}
		case req["responseBody"] != nil:
			body, _ := base64.StdEncoding.DecodeString(str(field(req, "responseBody", "body")))
			answer = p.handle(ctx, "response", "responseBody", ex, ex.response, body)
		case req["responseTrailers"] != nil:
			answer = obj{"responseTrailers": obj{}}
		default:
			answer = obj{"requestTrailers": obj{}}
		}
		encoded, err := json.Marshal(answer)
		if err != nil {
			return err
		}
		out := dynamicpb.NewMessage(d.response)
		if err := protojson.Unmarshal(encoded, out); err != nil {
			return err
		}
		if err := stream.SendMsg(out); err != nil {
			return err
		}
	}
}

func (p *Plugin) message(kind string, ex *exchange, headers [][2]string, body []byte) *Message {
	attr := func(key string) string { return str(ex.attributes[key]) }
	request := map[string]string{}
	for _, h := range ex.request {
		request[h[0]] = h[1]
	}
	m := &Message{
		Type: kind, Headers: map[string]string{}, Data: body,
		Metadata: Metadata{Priority: attr("nip.priority"), Fields: map[string]string{}},
		Tenant:   attr("nip.tenant"), Principal: attr("nip.principal"),
		Timestamp: attr("request.time"),
		Source:    Source{attr("listener_name"), attr("route_name"), attr("source.address")},
	}
	m.ID = attr("request.id")
	if m.ID == "" {
		m.ID = request["x-request-id"]
	}
	if m.Metadata.Priority == "" {
		m.Metadata.Priority = "normal"
	}
	fmt.Sscanf(request["x-nip-retry-count"], "%d", &m.Metadata.RetryCount)
	m.CorrelationID = m.ID
	if parts := strings.Split(request["traceparent"], "-"); len(parts) == 4 && len(parts[1]) == 32 {
		m.CorrelationID = parts[1]
	}
	for _, h := range headers {
		switch {
		case h[0] == ":method":
			m.Method = h[1]
		case h[0] == ":path":
			m.Path = h[1]
		case h[0] == ":status":
			fmt.Sscanf(h[1], "%d", &m.Status)
		case strings.HasPrefix(h[0], ":"):
		case strings.HasPrefix(h[0], metaPrefix):
			m.Metadata.Fields[strings.TrimPrefix(h[0], metaPrefix)] = h[1]
		default:
			if old, ok := m.Headers[h[0]]; ok {
				m.Headers[h[0]] = old + "," + h[1]
			} else {
				m.Headers[h[0]] = h[1]
			}
		}
	}
	essence := strings.ToLower(strings.TrimSpace(strings.Split(m.Headers["content-type"], ";")[0]))
	if len(body) > 0 && (essence == "application/json" || strings.HasSuffix(essence, "+json")) {
		var parsed interface{}
		if json.Unmarshal(body, &parsed) == nil {
			m.JSON = parsed
		}
	}
	return m
}

func option(name, value string) obj {
	return obj{"header": obj{"key": name, "rawValue": base64.StdEncoding.EncodeToString([]byte(value))}}
}

func immediate(status int, headers map[string]string, body []byte) obj {
	var set []interface{}
	for name, value := range headers {
		set = append(set, option(name, value))
	}
	return obj{"immediateResponse": obj{
		"status":  obj{"code": status},
		"headers": obj{"setHeaders": set},
		"body":    base64.StdEncoding.EncodeToString(body),
	}}
}

func (p *Plugin) handle(ctx *Context, kind, phase string, ex *exchange, headers [][2]string, body []byte) obj {
	original := p.message(kind, ex, headers, body)
	m := p.message(kind, ex, headers, body)
	reply, err := p.handler(ctx, m)
	if err != nil {
		code := 500
		if e, ok := err.(*Error); ok {
			code = e.Status
		}
		log.Printf("%s: %v", p.Name, err)
		msg := err.Error()
		if e, ok := err.(*Error); ok {
			msg = e.Message
		}
		return immediate(code, map[string]string{"content-type": "text/plain"}, []byte(msg+"\n"))
	}
	if reply != nil {
		return immediate(reply.Status, reply.Headers, reply.Body)
	}
	var set []interface{}
	var remove []interface{}
	for name, value := range m.Headers {
		if original.Headers[name] != value {
			set = append(set, option(name, value))
		}
	}
	for name := range original.Headers {
		if _, ok := m.Headers[name]; !ok {
			remove = append(remove, name)
		}
	}
	for name, value := range m.Metadata.Fields {
		if original.Metadata.Fields[name] != value {
			set = append(set, option(metaPrefix+name, value))
		}
	}
	if m.Metadata.Priority != original.Metadata.Priority {
		set = append(set, option("x-nip-priority", m.Metadata.Priority))
	}
	if m.Path != "" && m.Path != original.Path {
		set = append(set, option(":path", m.Path))
	}
	if m.Status != 0 && m.Status != original.Status {
		set = append(set, option(":status", fmt.Sprint(m.Status)))
	}
	common := obj{"headerMutation": obj{"setHeaders": set, "removeHeaders": remove}}
	if strings.HasSuffix(phase, "Body") {
		newBody := m.Data
		if m.JSON != nil {
			newBody, _ = json.Marshal(m.JSON)
		}
		oldBody := original.Data
		if original.JSON != nil {
			oldBody, _ = json.Marshal(original.JSON)
		}
		if string(newBody) != string(oldBody) {
			common["bodyMutation"] = obj{"body": base64.StdEncoding.EncodeToString(newBody)}
		}
	}
	wrapper := map[string]string{
		"requestHeaders": "requestHeaders", "requestBody": "requestBody",
		"responseHeaders": "responseHeaders", "responseBody": "responseBody",
	}[phase]
	return obj{wrapper: obj{"response": common}}
}
