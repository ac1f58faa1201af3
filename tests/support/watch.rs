//! A `patchbook watch` process for the tests that drive the service: started from
//! the test's command (`watch --listen 127.0.0.1:0 …`), its stdout and stderr
//! collected line by line, the status page's address read from its output, asked
//! over plain HTTP, stopped with SIGTERM, and killed on drop so no test leaves it
//! behind.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct WatchProcess {
    pub child: Child,
    /// Every line the service printed so far, stdout and stderr interleaved.
    pub out: Arc<Mutex<Vec<String>>>,
    /// `127.0.0.1:PORT` of the status page.
    pub addr: String,
}

impl WatchProcess {
    /// Spawns `cmd` and waits (up to 20 s) for it to name its status page.
    pub fn start(mut cmd: Command) -> WatchProcess {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let pipes = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ];
        // Owned at once, so a failed start below still kills and reaps it.
        let mut watch = WatchProcess {
            child,
            out: out.clone(),
            addr: String::new(),
        };
        for pipe in pipes {
            let o = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    o.lock().unwrap().push(line);
                }
            });
        }
        let t0 = Instant::now();
        loop {
            let found = out.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("status page: http://")
                    .map(|u| u.trim_end_matches('/').to_string())
            });
            if let Some(addr) = found {
                watch.addr = addr;
                return watch;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "watch did not start: {:#?}",
                out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything printed so far, one line each.
    pub fn output(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    /// The body of `GET path` on the status page.
    pub fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.get("/status.json")).unwrap()
    }

    /// Polls `/status.json` until `f` holds of it, for at most `within`.
    pub fn wait_status(&self, within: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < within,
                "{what} did not happen within {within:?}; status: {s:#}\noutput: {:#?}",
                self.out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits up to 30 s for the service to finish what it has in
    /// flight and exit.
    pub fn stop(&mut self) {
        // SAFETY: a plain signal to the child this test started.
        unsafe {
            libc::kill(self.child.id().cast_signed(), libc::SIGTERM);
        }
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("watch did not stop on SIGTERM: {}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
