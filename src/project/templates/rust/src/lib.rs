//! {{name}}: a NIP plugin on the Rust SDK (`nip-plugin`, vendored in ./nip-plugin).
//! Requests under /private are refused here; every other request goes upstream with an
//! `x-hello` header. `nip dev` rebuilds and reloads it when you save; `nip test
//! --integration` checks cases.yaml against it.

use nip_plugin::{main, Message, Plugin, Reply};

main! {
    Plugin::new("{{name}}")
        .version("0.1.0")
        .capability("local_reply")
        .on_message(|mut message: Message, _ctx| async move {
            if message.path().is_some_and(|path| path.starts_with("/private")) {
                return Ok(Reply::text(403, "private\n").into());
            }
            message.set_header("x-hello", "{{name}}");
            Ok(message.into())
        })
        .run()
}
