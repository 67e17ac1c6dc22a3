//! Child processes of the tests: the binaries under test, free ports, and
//! waiting for things to become true.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One of the workspace's binaries, from the shared target directory:
/// `target/debug/deps/fleet_e2e-…` → `target/debug/NAME`. `cargo test
/// --workspace` builds every binary before any test runs; `OUTPOST_BIN_DIR`
/// points elsewhere (e.g. a release build).
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("OUTPOST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("the test binary's path");
            exe.parent().and_then(Path::parent).expect("target/debug").to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p outpost-fleet -p outpost-agent` (or `cargo test --workspace`, which builds it)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A running child whose stderr (and stdout) go to a log file; killed
/// (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path, what: &str) -> Proc {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc { child, log: log.to_path_buf(), what: what.to_string() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs; `Err` with how it ended.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited with {status}:\n{}", self.what, tail(&self.log, 40))),
            Err(e) => Err(format!("{}: {e}", self.what)),
        }
    }

    /// SIGKILL: no chance to flush or say goodbye, like a power cut.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by this child's pid (never by name: other tests run
    /// the same binaries).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after
/// `timeout` with `what` and the context `explain` gives then.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>, explain: impl Fn() -> String) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
