//! The lab fleet: real OpenSSH sshd hosts on loopback, each in its own mount
//! namespace with its own dpkg database, for tests, demos and benchmarks.
//! It is never used by a real run.
