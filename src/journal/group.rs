//! Group commit over one connection: appenders of one process that arrive while a
//! write is in flight queue their items; whoever finds the connection free next
//! writes the whole queue in one go and hands every waiter its own result. It owns
//! the queue and the hand-over only: what an item is, how a batch is written and
//! what durable means belong to the caller's `write` function (for the PostgreSQL
//! store, [`super::pg::append_batch`]: one transaction per batch). It must not
//! return an item's result before the write holding that item has ended.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

/// Why a queued item was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupError {
    /// The write holding the item failed with this message.
    Failed(String),
    /// An earlier write failed: where the store ends is only known after a reopen,
    /// so nothing more is written through this connection.
    Broken(String),
}

struct State<C, I, R> {
    /// `None` while a leader (or a reader, [`Group::with_conn`]) has it.
    conn: Option<C>,
    /// Items waiting for the next write, with their tickets, in arrival order.
    queue: Vec<(u64, I)>,
    /// Results not yet picked up by their waiters, by ticket.
    done: HashMap<u64, Result<R, GroupError>>,
    next_ticket: u64,
    broken: Option<String>,
    /// How many writes ran: batches, not items.
    writes: u64,
}

/// A connection shared by the threads of one process, written to in batches.
pub(crate) struct Group<C, I, R> {
    state: Mutex<State<C, I, R>>,
    changed: Condvar,
}

impl<C, I, R> Group<C, I, R> {
    pub(crate) fn new(conn: C) -> Self {
        Group {
            state: Mutex::new(State {
                conn: Some(conn),
                queue: Vec::new(),
                done: HashMap::new(),
                next_ticket: 0,
                broken: None,
                writes: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Queues `item` and returns its result once the write holding it has ended.
    /// When the connection is free, this thread writes every queued item (its own
    /// among them) with `write`, which gets them in arrival order and must return
    /// one result per item, in that order, or fail them all.
    pub(crate) fn submit<W>(&self, item: I, write: W) -> Result<R, GroupError>
    where
        W: FnOnce(&mut C, Vec<I>) -> Result<Vec<R>, String>,
    {
        let mut write = Some(write);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(message) = &st.broken {
            return Err(GroupError::Broken(message.clone()));
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push((ticket, item));
        loop {
            if let Some(result) = st.done.remove(&ticket) {
                return result;
            }
            // The connection is free and our item is not done: it is still queued
            // (a write takes the whole queue), so this thread leads the next write.
            if !st.queue.is_empty() && st.conn.is_some() {
                let batch = std::mem::take(&mut st.queue);
                if let Some(message) = st.broken.clone() {
                    for (t, _) in batch {
                        st.done.insert(t, Err(GroupError::Broken(message.clone())));
                    }
                    self.changed.notify_all();
                    continue;
                }
                let (Some(mut conn), Some(write)) = (st.conn.take(), write.take()) else {
                    // Unreachable: checked above, and a thread leads at most once
                    // since its own item is in the batch it leads.
                    continue;
                };
                st.writes += 1;
                drop(st);
                let (tickets, items): (Vec<u64>, Vec<I>) = batch.into_iter().unzip();
                let n = tickets.len();
                let outcome = write(&mut conn, items);
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.conn = Some(conn);
                match outcome {
                    Ok(results) if results.len() == n => {
                        for (t, r) in tickets.into_iter().zip(results) {
                            st.done.insert(t, Ok(r));
                        }
                    }
                    Ok(results) => {
                        let message = format!(
                            "a batch of {n} records came back with {} results",
                            results.len()
                        );
                        st.broken = Some(message.clone());
                        for t in tickets {
                            st.done.insert(t, Err(GroupError::Failed(message.clone())));
                        }
                    }
                    Err(message) => {
                        st.broken = Some(message.clone());
                        for t in tickets {
                            st.done.insert(t, Err(GroupError::Failed(message.clone())));
                        }
                    }
                }
                self.changed.notify_all();
                continue;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs `f` on the connection once no write is in flight (a read that must not
    /// interleave with a batch). Refused once a write failed.
    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&mut C) -> T) -> Result<T, GroupError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut conn = loop {
            if let Some(message) = &st.broken {
                return Err(GroupError::Broken(message.clone()));
            }
            if let Some(conn) = st.conn.take() {
                break conn;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        };
        drop(st);
        let out = f(&mut conn);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.conn = Some(conn);
        // Appenders that queued meanwhile wait for the connection.
        self.changed.notify_all();
        Ok(out)
    }

    /// How many writes (batches) ran so far.
    pub(crate) fn writes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A "connection" that is a log of batches: each write appends its items as
    /// one batch and numbers them, as a store assigns seqs.
    type Log = Vec<Vec<u32>>;

    fn write(log: &mut Log, items: Vec<u32>) -> Result<Vec<usize>, String> {
        std::thread::sleep(Duration::from_millis(5));
        let first = log.iter().map(Vec::len).sum::<usize>();
        let seqs = (first..first + items.len()).collect();
        log.push(items);
        Ok(seqs)
    }

    #[test]
    fn concurrent_items_share_writes_and_each_gets_its_own_result() {
        let group: Arc<Group<Log, u32, usize>> = Arc::new(Group::new(Vec::new()));
        let threads: Vec<_> = (0..16u32)
            .map(|t| {
                let group = Arc::clone(&group);
                std::thread::spawn(move || {
                    (0..10u32)
                        .map(|i| (t * 100 + i, group.submit(t * 100 + i, write).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut got: Vec<(u32, usize)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let log = group.with_conn(|log| log.clone()).unwrap();
        let flat: Vec<u32> = log.iter().flatten().copied().collect();
        assert_eq!(flat.len(), 160, "every item written exactly once");
        // Each item's result is its own position in the log.
        for (item, seq) in &got {
            assert_eq!(flat[*seq], *item);
        }
        got.sort_unstable();
        got.dedup_by_key(|(i, _)| *i);
        assert_eq!(got.len(), 160);
        assert!(
            group.writes() < 160,
            "{} writes for 160 items: nothing was batched",
            group.writes()
        );
        assert_eq!(group.writes(), u64::try_from(log.len()).unwrap());
    }

    #[test]
    fn a_failed_write_fails_its_batch_and_breaks_the_group() {
        let group: Group<Log, u32, usize> = Group::new(Vec::new());
        assert_eq!(group.submit(1, write), Ok(0));
        let failed = group.submit(2, |_: &mut Log, _| Err("connection lost".to_string()));
        assert_eq!(failed, Err(GroupError::Failed("connection lost".into())));
        assert_eq!(
            group.submit(3, write),
            Err(GroupError::Broken("connection lost".into()))
        );
        assert!(group.with_conn(|_| ()).is_err());
    }
}
