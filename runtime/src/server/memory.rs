//! Keeping a long-running server's resident memory to what serving needs.
//!
//! Measured on the breast-cancer MLP (x86_64, glibc, release build), almost
//! all of a freshly started server's resident memory is *code*: parsing the
//! ONNX protobuf and running tract's optimizer touch megabytes of machine
//! code spread over the binary, and the kernel maps file pages 64 KiB at a
//! time around each fault ("fault-around"). After start-up that code is
//! never run again, yet it stays counted in the process's RSS. The heap
//! holds about a megabyte.
//!
//! [`release_startup_memory`] hands those pages back: it marks the clean
//! read-only file mappings (the binary's code and read-only data, shared
//! libraries') `MADV_RANDOM` (no fault-around: a page comes back alone when
//! it is needed) and `MADV_DONTNEED` (unmap what is resident). What the
//! serving path uses faults back in within the first requests, so resident
//! memory settles at the serving working set. Nothing is lost: those pages
//! are exact copies of the file. Mappings that were ever writable (relocated
//! RELRO data, `VM_ACCOUNT` in smaps) differ from the file and are left alone.
//!
//! It also calls glibc's `malloc_trim`, which returns the free pages left
//! inside the heap by loading (protobuf parsing, graph rewriting) to the kernel.
//!
//! [`limit_malloc_arenas`] caps glibc's per-thread malloc arenas, which glibc
//! would give up to 8 × cores threads, each keeping freed memory around.
//! `serve` asks for one per thread that allocates per request (workers, the
//! overflow dispatcher, main) and no more: threads that share an arena take
//! its lock on every allocation, and two workers sharing one served bc_mlp
//! at half the rate (23k vs 45k req/s at 32 connections on 2 cores).
//! (Before the event-driven tiny_http, every connection had a thread, and
//! the cap was 2.)
//!
//! Both are Linux-only (glibc for the second) and no-ops elsewhere. The
//! peak (`VmHWM`) still shows the start-up high-water mark.

/// Drops the resident pages of clean read-only file mappings, and hands the
/// heap's free pages back to the kernel (glibc `malloc_trim`); see the module
/// docs. Returns the bytes of this executable's mappings advised. Call it
/// once the model is loaded and warmed up.
pub fn release_startup_memory() -> std::io::Result<usize> {
    imp::trim_heap();
    imp::release_startup_code()
}

/// Caps glibc malloc at `arenas` arenas (call before starting threads).
/// Returns whether the setting took.
pub fn limit_malloc_arenas(arenas: usize) -> bool {
    imp::limit_malloc_arenas(arenas)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;

    /// One mapping of /proc/self/smaps: address range, whether it may be
    /// dropped, and whether it is our executable.
    struct Mapping {
        start: usize,
        end: usize,
        file: Option<String>,
        read_only: bool,
        ever_writable: bool,
    }

    fn mappings() -> io::Result<Vec<Mapping>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut out: Vec<Mapping> = Vec::new();
        for line in smaps.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                // VM_ACCOUNT ("ac") marks a private mapping that was writable at
                // some point (e.g. RELRO data relocated at load): its pages
                // may differ from the file, so it must never be dropped.
                if let Some(m) = out.last_mut() {
                    m.ever_writable = flags.split_whitespace().any(|f| f == "ac");
                }
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
            let Some((start, end)) = range.split_once('-') else { continue };
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                continue; // a "Key: value" line of the previous mapping
            };
            let file = fields.nth(3).filter(|p| p.starts_with('/')).map(str::to_string);
            out.push(Mapping {
                start,
                end,
                file,
                read_only: perms.starts_with('r') && !perms.contains('w'),
                ever_writable: true,
            });
        }
        Ok(out)
    }

    pub fn release_startup_code() -> io::Result<usize> {
        let exe = std::fs::read_link("/proc/self/exe")?.to_string_lossy().into_owned();
        let mut advised = 0;
        for m in mappings()? {
            // Clean, read-only file mappings only: the executable's code and
            // read-only data, and shared libraries'. Their pages are exact
            // copies of the file.
            if m.file.is_none() || !m.read_only || m.ever_writable {
                continue;
            }
            let len = m.end.saturating_sub(m.start);
            // SAFETY: [start, end) is a whole mapping read from
            // /proc/self/smaps: page-aligned, mapped, file-backed, read-only
            // and never writable, so its pages are clean copies of the file.
            // MADV_RANDOM only changes read-ahead; MADV_DONTNEED on such a
            // private file mapping drops the page table entries and the next
            // access faults the same bytes back in from the file.
            let ok = unsafe {
                libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_RANDOM) == 0
                    && libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0
            };
            if !ok {
                return Err(io::Error::last_os_error());
            }
            if m.file.as_deref() == Some(exe.as_str()) {
                advised += len;
            }
        }
        Ok(advised)
    }

    /// Loading parses protobuf and rewrites graphs: megabytes allocated and
    /// freed, leaving free pages inside the heap that glibc keeps resident.
    #[cfg(target_env = "gnu")]
    pub fn trim_heap() {
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
    }

    #[cfg(not(target_env = "gnu"))]
    pub fn trim_heap() {}

    #[cfg(target_env = "gnu")]
    pub fn limit_malloc_arenas(arenas: usize) -> bool {
        let n = arenas.clamp(1, i32::MAX as usize) as libc::c_int;
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }

    #[cfg(not(target_env = "gnu"))]
    pub fn limit_malloc_arenas(_arenas: usize) -> bool {
        false
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn trim_heap() {}

    pub fn release_startup_code() -> std::io::Result<usize> {
        Ok(0)
    }

    pub fn limit_malloc_arenas(_arenas: usize) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn releasing_code_keeps_the_process_running() {
        let advised = super::release_startup_memory().expect("madvise");
        assert!(advised > 0);
        // Code still runs after its pages were dropped.
        let v: Vec<u64> = (0..1000).map(|x| x * x).collect();
        assert_eq!(v[999], 998001);
    }
}
