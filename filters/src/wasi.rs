//! The whole WASI preview1 import set, so that modules built by any toolchain (Rust, C,
//! AssemblyScript, TinyGo) instantiate. What a plugin may use is real: stdout/stderr go
//! to the proxy's log, clocks, randomness, empty args/environment, `proc_exit`. Everything
//! that would reach the file system or the network answers `ENOSYS`, and there are no
//! preopened directories.

use crate::host::{guest_memory, HostState};
use std::time::{SystemTime, UNIX_EPOCH};
use wasmtime::{Caller, Linker};

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;
const ESPIPE: i32 = 70;

/// The module names WASI imports come from.
const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

fn write_bytes(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(memory) = guest_memory(caller) else {
        return false;
    };
    memory.write(caller, ptr as u32 as usize, bytes).is_ok()
}

fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, value: u32) -> bool {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, value: u64) -> bool {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

/// `answer` for stdin/stdout/stderr, `EBADF` for any other descriptor (there are none).
fn on_stdio(fd: i32, answer: i32) -> i32 {
    if (0..=2).contains(&fd) {
        answer
    } else {
        EBADF
    }
}

fn status(ok: bool) -> i32 {
    if ok {
        SUCCESS
    } else {
        EFAULT
    }
}

/// Gathers an iovec array (`{ptr: u32, len: u32}` each) from guest memory.
fn gather(caller: &mut Caller<'_, HostState>, iovs: i32, count: i32) -> Option<Vec<u8>> {
    let memory = guest_memory(caller)?;
    let data = memory.data(&*caller);
    let mut out = Vec::new();
    for i in 0..count.max(0) as usize {
        let at = iovs as u32 as usize + i * 8;
        let entry = data.get(at..at + 8)?;
        let ptr = u32::from_le_bytes(entry[0..4].try_into().ok()?) as usize;
        let len = u32::from_le_bytes(entry[4..8].try_into().ok()?) as usize;
        out.extend_from_slice(data.get(ptr..ptr.checked_add(len)?)?);
    }
    Some(out)
}

macro_rules! enosys {
    ($linker:expr, $module:expr, $name:literal, ($($arg:ty),*)) => {
        $linker.func_wrap($module, $name, |$(_: $arg),*| -> i32 { ENOSYS })?;
    };
}

/// Defines every WASI preview1 function on `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    for module in MODULES {
        linker.func_wrap(
            module,
            "args_sizes_get",
            |mut c: Caller<'_, HostState>, argc: i32, size: i32| {
                status(write_u32(&mut c, argc, 0) && write_u32(&mut c, size, 0))
            },
        )?;
        linker.func_wrap(module, "args_get", |_: i32, _: i32| SUCCESS)?;
        linker.func_wrap(
            module,
            "environ_sizes_get",
            |mut c: Caller<'_, HostState>, count: i32, size: i32| {
                status(write_u32(&mut c, count, 0) && write_u32(&mut c, size, 0))
            },
        )?;
        linker.func_wrap(module, "environ_get", |_: i32, _: i32| SUCCESS)?;
        linker.func_wrap(
            module,
            "clock_res_get",
            |mut c: Caller<'_, HostState>, _id: i32, out: i32| status(write_u64(&mut c, out, 1)),
        )?;
        linker.func_wrap(
            module,
            "clock_time_get",
            |mut c: Caller<'_, HostState>, id: i32, _precision: i64, out: i32| {
                let nanos = match id {
                    // Monotonic and CPU-time clocks: time since this instance started.
                    1..=3 => c.data().started.elapsed().as_nanos() as u64,
                    _ => SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                };
                status(write_u64(&mut c, out, nanos))
            },
        )?;
        linker.func_wrap(
            module,
            "fd_write",
            |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, count: i32, written: i32| {
                if fd != 1 && fd != 2 {
                    return EBADF;
                }
                let Some(bytes) = gather(&mut c, iovs, count) else {
                    return EFAULT;
                };
                c.data().guest_output(fd == 2, &bytes);
                status(write_u32(&mut c, written, bytes.len() as u32))
            },
        )?;
        linker.func_wrap(
            module,
            "fd_read",
            |mut c: Caller<'_, HostState>, fd: i32, _iovs: i32, _count: i32, read: i32| {
                if fd != 0 {
                    return EBADF;
                }
                // stdin is empty.
                status(write_u32(&mut c, read, 0))
            },
        )?;
        linker.func_wrap(module, "fd_close", |fd: i32| on_stdio(fd, SUCCESS))?;
        linker.func_wrap(
            module,
            "fd_fdstat_get",
            |mut c: Caller<'_, HostState>, fd: i32, out: i32| {
                if !(0..=2).contains(&fd) {
                    return EBADF;
                }
                // filetype CHARACTER_DEVICE, no flags, no rights.
                let mut stat = [0u8; 24];
                stat[0] = 2;
                status(write_bytes(&mut c, out, &stat))
            },
        )?;
        linker.func_wrap(module, "fd_prestat_get", |_: i32, _: i32| EBADF)?;
        linker.func_wrap(module, "fd_prestat_dir_name", |_: i32, _: i32, _: i32| {
            EBADF
        })?;
        linker.func_wrap(module, "fd_seek", |fd: i32, _: i64, _: i32, _: i32| {
            on_stdio(fd, ESPIPE)
        })?;
        linker.func_wrap(module, "fd_tell", |fd: i32, _: i32| on_stdio(fd, ESPIPE))?;
        linker.func_wrap(module, "fd_sync", |fd: i32| on_stdio(fd, SUCCESS))?;
        linker.func_wrap(module, "fd_datasync", |fd: i32| on_stdio(fd, SUCCESS))?;
        linker.func_wrap(module, "fd_fdstat_set_flags", |fd: i32, _: i32| {
            on_stdio(fd, SUCCESS)
        })?;
        linker.func_wrap(
            module,
            "random_get",
            |mut c: Caller<'_, HostState>, buf: i32, len: i32| {
                if len < 0 {
                    return EINVAL;
                }
                let mut bytes = vec![0u8; len as usize];
                if getrandom::fill(&mut bytes).is_err() {
                    fastrand::fill(&mut bytes);
                }
                status(write_bytes(&mut c, buf, &bytes))
            },
        )?;
        linker.func_wrap(module, "sched_yield", || SUCCESS)?;
        linker.func_wrap(
            module,
            "poll_oneoff",
            |mut c: Caller<'_, HostState>,
             subscriptions: i32,
             events: i32,
             count: i32,
             out_count: i32| {
                // Every subscription fires at once: a plugin may not sleep on a proxy
                // worker, and Go's runtime only needs the call to succeed.
                let Some(memory) = guest_memory(&mut c) else {
                    return EFAULT;
                };
                let mut written = 0u32;
                for i in 0..count.max(0) as usize {
                    let mut sub = [0u8; 48];
                    if memory
                        .read(&c, subscriptions as u32 as usize + i * 48, &mut sub)
                        .is_err()
                    {
                        return EFAULT;
                    }
                    let mut event = [0u8; 32];
                    event[0..8].copy_from_slice(&sub[0..8]); // userdata
                    event[10] = sub[8]; // type: clock, fd_read, fd_write
                    if memory
                        .write(&mut c, events as u32 as usize + i * 32, &event)
                        .is_err()
                    {
                        return EFAULT;
                    }
                    written += 1;
                }
                status(write_u32(&mut c, out_count, written))
            },
        )?;
        linker.func_wrap(module, "proc_exit", |code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "plugin called proc_exit({code})"
            )))
        })?;
        enosys!(linker, module, "proc_raise", (i32));
        enosys!(linker, module, "fd_advise", (i32, i64, i64, i32));
        enosys!(linker, module, "fd_allocate", (i32, i64, i64));
        enosys!(linker, module, "fd_fdstat_set_rights", (i32, i64, i64));
        enosys!(linker, module, "fd_filestat_get", (i32, i32));
        enosys!(linker, module, "fd_filestat_set_size", (i32, i64));
        enosys!(
            linker,
            module,
            "fd_filestat_set_times",
            (i32, i64, i64, i32)
        );
        enosys!(linker, module, "fd_pread", (i32, i32, i32, i64, i32));
        enosys!(linker, module, "fd_pwrite", (i32, i32, i32, i64, i32));
        enosys!(linker, module, "fd_readdir", (i32, i32, i32, i64, i32));
        enosys!(linker, module, "fd_renumber", (i32, i32));
        enosys!(linker, module, "path_create_directory", (i32, i32, i32));
        enosys!(
            linker,
            module,
            "path_filestat_get",
            (i32, i32, i32, i32, i32)
        );
        enosys!(
            linker,
            module,
            "path_filestat_set_times",
            (i32, i32, i32, i32, i64, i64, i32)
        );
        enosys!(
            linker,
            module,
            "path_link",
            (i32, i32, i32, i32, i32, i32, i32)
        );
        enosys!(
            linker,
            module,
            "path_open",
            (i32, i32, i32, i32, i32, i64, i64, i32, i32)
        );
        enosys!(
            linker,
            module,
            "path_readlink",
            (i32, i32, i32, i32, i32, i32)
        );
        enosys!(linker, module, "path_remove_directory", (i32, i32, i32));
        enosys!(
            linker,
            module,
            "path_rename",
            (i32, i32, i32, i32, i32, i32)
        );
        enosys!(linker, module, "path_symlink", (i32, i32, i32, i32, i32));
        enosys!(linker, module, "path_unlink_file", (i32, i32, i32));
        enosys!(linker, module, "sock_accept", (i32, i32, i32));
        enosys!(linker, module, "sock_recv", (i32, i32, i32, i32, i32, i32));
        enosys!(linker, module, "sock_send", (i32, i32, i32, i32, i32));
        enosys!(linker, module, "sock_shutdown", (i32, i32));
    }
    Ok(())
}
