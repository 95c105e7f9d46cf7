//! An empty `on_message`: every request becomes a message and goes on unchanged. The
//! SDK's cost per request is this plugin's minus the raw `noop` plugin's (bench/).

use nip_plugin::{main, Message, Plugin};

main! {
    Plugin::new("sdk-noop")
        .version("1.0.0")
        .on_message(|message: Message, _ctx| async move { Ok(message.into()) })
        .run()
}
