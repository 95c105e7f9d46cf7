//! Threads of the proxy's own that run a tokio runtime beside pingora's workers (the
//! control thread, the xDS client): one helper, used by `server` and `xds_feed`.

/// Runs the future `make` returns on a thread of its own with a current-thread runtime (the
/// control thread, the xDS client). Without that runtime the proxy cannot work: it exits.
pub(crate) fn spawn_runtime_thread<F>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()>,
{
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(make()),
                Err(e) => {
                    tracing::error!("{thread}: runtime failed to start: {e}");
                    std::process::exit(1);
                }
            }
        })
        .map(drop)
}
