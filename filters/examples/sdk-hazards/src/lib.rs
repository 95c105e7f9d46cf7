//! Misbehaves on request: `x-hazard: panic` panics in the handler, `loop` never returns,
//! `alloc` allocates until memory runs out; anything else passes. The host must contain
//! each exactly as it contains a raw proxy-wasm plugin doing the same.

use nip_plugin::{main, Health, Message, Plugin};

main! {
    Plugin::new("sdk-hazards")
        .version("1.0.0")
        .health_check(|| Health::failing("built to fail"))
        .resource_usage(|| nip_plugin::json!({ "hazards": 3 }))
        .on_message(|message: Message, _ctx| async move {
            match message.header("x-hazard") {
                Some("panic") => panic!("asked to panic"),
                Some("loop") => {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                Some("alloc") => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                _ => Ok(message.into()),
            }
        })
        .run()
}
