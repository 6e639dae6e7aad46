//! Reliable chat: users with stream management (XEP-0198) send uniquely
//! numbered messages to each other over the nodes of a cluster. When a node
//! dies or redirects them they reconnect elsewhere, resume when they can,
//! bind afresh when they cannot, and resend what the server had not
//! acknowledged, as a careful mobile client does.
//!
//! A [`Ledger`] records every message sent, every acknowledgement from the
//! server, and every arrival. A message the server acknowledged that never
//! reached its recipient is **lost**; one that arrived twice is a duplicate.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use minidom::Element;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::client::{Connection, Sender, StreamError, Target};

const SM: &str = "urn:xmpp:sm:3";
const CLIENT: &str = "jabber:client";
/// How often a client asks for (and gives) acknowledgements while some are due.
const ACK_INTERVAL: Duration = Duration::from_millis(250);
/// How long a clean close may take at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The nodes; user `i` starts on node `i % nodes.len()`.
    pub nodes: Vec<SocketAddr>,
    /// Domain, TLS mode, mechanism and source addresses (its address is unused).
    pub target: Target,
    /// Account names.
    pub users: Vec<String>,
    /// Password of every account.
    pub password: String,
    /// Resource every user binds.
    pub resource: String,
    /// Messages per second, all users together.
    pub rate: f64,
    /// Logins in flight at once at the start.
    pub login_concurrency: usize,
    /// How long the first login of every user may take.
    pub login_timeout: Duration,
}

/// The counts at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Distinct messages sent.
    pub sent: u64,
    /// Distinct messages the server acknowledged (XEP-0198 `<a/>`, `<resumed/>`, `<failed h/>`).
    pub acknowledged: u64,
    /// Distinct messages that reached their recipient.
    pub delivered: u64,
    /// Arrivals beyond the first.
    pub duplicated: u64,
    /// Acknowledged by the server, never delivered.
    pub lost: u64,
    /// Sent but neither acknowledged nor delivered (the client gave up on them).
    pub unconfirmed: u64,
    /// Arrived at a user it was not sent to.
    pub misdelivered: u64,
    /// Arrived after a later message of the same sender to the same recipient.
    pub inversions: u64,
    /// Bounced back with a message error.
    pub bounced: u64,
    /// Connections that ended and were replaced.
    pub reconnects: u64,
    /// Successful resumptions.
    pub resumed: u64,
    /// Failed resumptions (a new session was bound instead).
    pub resume_failed: u64,
    /// `see-other-host` redirects followed.
    pub redirected: u64,
    /// Delivery latency of first arrivals, milliseconds.
    pub latency_ms_p50: f64,
    /// 99th percentile.
    pub latency_ms_p99: f64,
    /// Maximum.
    pub latency_ms_max: f64,
    /// The first lost messages, as `id -> recipient` with when each was sent
    /// and acknowledged (since the start of the run), to look for in logs
    /// and storage.
    pub lost_examples: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} acknowledged {} delivered {} duplicated {} lost {} unconfirmed {} misdelivered {} bounced {} inversions {}; reconnects {} resumed {} resume-failed {} redirected {}; latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            self.sent,
            self.acknowledged,
            self.delivered,
            self.duplicated,
            self.lost,
            self.unconfirmed,
            self.misdelivered,
            self.bounced,
            self.inversions,
            self.reconnects,
            self.resumed,
            self.resume_failed,
            self.redirected,
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.latency_ms_max,
        )?;
        if !self.lost_examples.is_empty() {
            write!(f, "; lost {}", self.lost_examples.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Sent {
    /// The sender's index in the users.
    from: usize,
    to: String,
    at: Duration,
}

/// A message that reached its recipient after a later one from the same sender.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Inversion {
    /// Its number.
    pub seq: u64,
    /// When it was sent, since the start of the run.
    pub sent_at: Duration,
    /// When it arrived.
    pub arrived_at: Duration,
}

#[derive(Debug, Default)]
struct Book {
    sent: HashMap<u64, Sent>,
    /// When the server acknowledged each message.
    acknowledged: HashMap<u64, Duration>,
    arrivals: HashMap<u64, u32>,
    latencies: Vec<Duration>,
    misdelivered: u64,
    bounced: u64,
    /// The highest message number arrived per sender and recipient.
    newest: HashMap<(usize, String), u64>,
    inversions: Vec<Inversion>,
}

impl Book {
    /// The lost messages (acknowledged, never delivered), with when each
    /// was acknowledged.
    fn lost(&self) -> impl Iterator<Item = (u64, Duration)> + '_ {
        self.acknowledged
            .iter()
            .filter(|(seq, _)| !self.arrivals.contains_key(seq))
            .map(|(seq, at)| (*seq, *at))
    }
}

/// What was sent, acknowledged and delivered.
#[derive(Debug)]
pub struct Ledger {
    epoch: Instant,
    next: AtomicU64,
    book: Mutex<Book>,
    reconnects: AtomicU64,
    resumed: AtomicU64,
    resume_failed: AtomicU64,
    redirected: AtomicU64,
}

impl Ledger {
    fn new() -> Ledger {
        Ledger {
            epoch: Instant::now(),
            next: AtomicU64::new(1),
            book: Mutex::new(Book::default()),
            reconnects: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            resume_failed: AtomicU64::new(0),
            redirected: AtomicU64::new(0),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("ledger lock")
    }

    /// Numbers a new message from user `from` to `to` and records it.
    fn record_sent(&self, from: usize, to: &str) -> (u64, Duration) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let at = self.epoch.elapsed();
        self.book().sent.insert(
            seq,
            Sent {
                from,
                to: to.to_owned(),
                at,
            },
        );
        (seq, at)
    }

    fn record_acknowledged(&self, seqs: impl IntoIterator<Item = u64>) {
        let now = self.epoch.elapsed();
        let mut book = self.book();
        for seq in seqs {
            book.acknowledged.entry(seq).or_insert(now);
        }
    }

    fn record_arrival(&self, seq: u64, at: &str) {
        let now = self.epoch.elapsed();
        let mut book = self.book();
        let Some(sent) = book.sent.get(&seq) else {
            book.misdelivered += 1;
            return;
        };
        if sent.to != at {
            book.misdelivered += 1;
            return;
        }
        let latency = now.saturating_sub(sent.at);
        let (from, sent_at) = (sent.from, sent.at);
        let count = book.arrivals.entry(seq).or_default();
        *count += 1;
        if *count == 1 {
            book.latencies.push(latency);
            // Numbers grow with time for each sender: an arrival below the
            // highest one seen from the same sender is out of order.
            let newest = book.newest.entry((from, at.to_owned())).or_default();
            if *newest > seq {
                book.inversions.push(Inversion {
                    seq,
                    sent_at,
                    arrived_at: now,
                });
            } else {
                *newest = seq;
            }
        }
    }

    /// The lost messages (acknowledged, never delivered), each with when it
    /// was acknowledged since the start of the run, in order of number.
    pub fn lost_acknowledged_at(&self) -> Vec<(u64, Duration)> {
        let mut lost: Vec<_> = self.book().lost().collect();
        lost.sort_unstable();
        lost
    }

    /// Message `seq` as `m<seq> -> recipient (sent .. s, acknowledged .. s)`.
    pub fn describe(&self, seq: u64) -> String {
        let book = self.book();
        let Some(sent) = book.sent.get(&seq) else {
            return format!("m{seq} (never sent)");
        };
        let acknowledged = book.acknowledged.get(&seq).map_or_else(
            || "never".to_owned(),
            |at| format!("{:.2} s", at.as_secs_f64()),
        );
        format!(
            "m{seq} -> {} (sent {:.2} s, acknowledged {acknowledged})",
            sent.to,
            sent.at.as_secs_f64()
        )
    }

    /// When the run started (message times count from here).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// The messages that arrived after a later one of the same sender to the same recipient.
    pub fn inversions(&self) -> Vec<Inversion> {
        self.book().inversions.clone()
    }

    fn record_bounce(&self) {
        self.book().bounced += 1;
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.book().sent.len() as u64
    }

    /// Messages delivered so far (distinct).
    pub fn delivered(&self) -> u64 {
        self.book().arrivals.len() as u64
    }

    /// Every message acknowledged, and every acknowledged one delivered.
    pub fn settled(&self) -> bool {
        let book = self.book();
        book.acknowledged.len() == book.sent.len() && book.lost().next().is_none()
    }

    /// The counts now.
    pub fn report(&self) -> Report {
        let book = self.book();
        let mut lost: Vec<u64> = book.lost().map(|(seq, _)| seq).collect();
        lost.sort_unstable();
        let mut latencies = book.latencies.clone();
        latencies.sort_unstable();
        let percentile = |p: f64| {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies[index].as_secs_f64() * 1000.0
        };
        Report {
            sent: book.sent.len() as u64,
            acknowledged: book.acknowledged.len() as u64,
            delivered: book.arrivals.len() as u64,
            duplicated: book.arrivals.values().map(|n| u64::from(n - 1)).sum(),
            lost: lost.len() as u64,
            unconfirmed: book
                .sent
                .keys()
                .filter(|seq| {
                    !book.acknowledged.contains_key(seq) && !book.arrivals.contains_key(seq)
                })
                .count() as u64,
            misdelivered: book.misdelivered,
            inversions: book.inversions.len() as u64,
            bounced: book.bounced,
            reconnects: self.reconnects.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            resume_failed: self.resume_failed.load(Ordering::Relaxed),
            redirected: self.redirected.load(Ordering::Relaxed),
            latency_ms_p50: percentile(0.5),
            latency_ms_p99: percentile(0.99),
            latency_ms_max: latencies
                .last()
                .map_or(f64::NAN, |l| l.as_secs_f64() * 1000.0),
            lost_examples: lost
                .iter()
                .take(10)
                .map(|seq| {
                    let sent = &book.sent[seq];
                    format!(
                        "m{seq} -> {} (sent {:.2} s, acknowledged {:.2} s)",
                        sent.to,
                        sent.at.as_secs_f64(),
                        book.acknowledged[seq].as_secs_f64()
                    )
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Logged in, waiting for the others.
    Login,
    /// Sending at the configured rate.
    Sending,
    /// No new messages; acknowledging, receiving and reconnecting go on.
    Quiet,
    /// Close the streams and stop.
    Finish,
}

/// A running reliable chat.
#[derive(Debug)]
pub struct Chat {
    ledger: Arc<Ledger>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
}

impl Chat {
    /// Logs every user in (with stream management) and starts sending.
    pub async fn start(settings: Settings) -> anyhow::Result<Chat> {
        anyhow::ensure!(settings.users.len() >= 2, "reliable chat needs two users");
        anyhow::ensure!(!settings.nodes.is_empty(), "no node to connect to");
        let settings = Arc::new(settings);
        let ledger = Arc::new(Ledger::new());
        let (phase, watcher) = watch::channel(Phase::Login);
        let logins = Arc::new(Semaphore::new(settings.login_concurrency.max(1)));
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        for (index, user) in settings.users.iter().enumerate() {
            let (done, wait) = oneshot::channel();
            let actor = Actor {
                index,
                bare: format!("{user}@{}", settings.target.domain),
                user: user.clone(),
                node: index % settings.nodes.len(),
                settings: settings.clone(),
                ledger: ledger.clone(),
                phase: watcher.clone(),
                redirect: None,
                previd: None,
                inbound: 0,
                outbound: 0,
                unacked: VecDeque::new(),
            };
            tasks.push(tokio::spawn(actor.run(done, logins.clone())));
            ready.push((user.clone(), wait));
        }
        let chat = Chat {
            ledger,
            phase,
            tasks,
        };
        let deadline = tokio::time::Instant::now() + settings.login_timeout;
        for (user, wait) in ready {
            let outcome = tokio::time::timeout_at(deadline, wait).await;
            let failure = match outcome {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(error))) => error,
                Ok(Err(_)) => anyhow::anyhow!("the client task ended"),
                Err(_) => anyhow::anyhow!("timed out"),
            };
            chat.abort();
            return Err(failure.context(format!("{user} could not log in")));
        }
        chat.phase.send_replace(Phase::Sending);
        Ok(chat)
    }

    /// The ledger, for progress while it runs.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The ledger, to read after [`finish`](Chat::finish).
    pub fn shared_ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// Stops sending, waits (at most `settle`) until every message is
    /// acknowledged and every acknowledged one delivered, closes every stream,
    /// and reports.
    pub async fn finish(self, settle: Duration) -> Report {
        self.phase.send_replace(Phase::Quiet);
        let deadline = tokio::time::Instant::now() + settle;
        while !self.ledger.settled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Late duplicates, if any, arrive now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.phase.send_replace(Phase::Finish);
        for task in &self.tasks {
            while !task.is_finished() && tokio::time::Instant::now() < deadline + CLOSE_TIMEOUT * 2
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.abort();
        self.ledger.report()
    }

    fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        self.abort();
    }
}

/// A stanza sent under stream management and not yet acknowledged.
#[derive(Debug)]
struct Outgoing {
    /// Its number in the stream's count of sent stanzas.
    index: u32,
    xml: String,
    /// The message number, for messages of the chat.
    seq: Option<u64>,
}

/// How a connection ended.
enum End {
    /// The run is over.
    Finished,
    /// The connection was lost.
    Lost,
    /// The server sent us elsewhere.
    Redirect(SocketAddr),
}

struct Actor {
    index: usize,
    user: String,
    bare: String,
    node: usize,
    settings: Arc<Settings>,
    ledger: Arc<Ledger>,
    phase: watch::Receiver<Phase>,
    redirect: Option<SocketAddr>,
    previd: Option<String>,
    /// Stanzas received in the current stream-management session.
    inbound: u32,
    /// Stanzas sent in the current stream-management session.
    outbound: u32,
    unacked: VecDeque<Outgoing>,
}

impl Actor {
    async fn run(mut self, ready: oneshot::Sender<anyhow::Result<()>>, logins: Arc<Semaphore>) {
        let mut ready = Some(ready);
        let mut failures = 0u32;
        loop {
            if *self.phase.borrow() == Phase::Finish {
                return;
            }
            let address = self
                .redirect
                .take()
                .unwrap_or(self.settings.nodes[self.node]);
            let connected = {
                let _permit = match ready {
                    Some(_) => Some(logins.acquire().await.expect("open semaphore")),
                    None => None,
                };
                self.connect(address).await
            };
            match connected {
                Ok(connection) => {
                    failures = 0;
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    match self.session(connection).await {
                        End::Finished => return,
                        End::Redirect(address) => {
                            self.ledger.redirected.fetch_add(1, Ordering::Relaxed);
                            self.redirect = Some(address);
                        }
                        End::Lost => {}
                    }
                    self.ledger.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    failures += 1;
                    match error
                        .downcast_ref::<StreamError>()
                        .and_then(StreamError::other_host)
                        .and_then(|host| host.parse().ok())
                    {
                        Some(address) => {
                            self.ledger.redirected.fetch_add(1, Ordering::Relaxed);
                            self.redirect = Some(address);
                        }
                        None => self.node = (self.node + 1) % self.settings.nodes.len(),
                    }
                    if ready.is_some() && failures as usize >= 3 * self.settings.nodes.len() {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Err(error));
                        }
                        return;
                    }
                    let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Logs in at `address`: resumes the previous session if there is one, else binds anew.
    async fn connect(&mut self, address: SocketAddr) -> anyhow::Result<Connection> {
        let mut target = self.settings.target.clone();
        target.address = address;
        let mut connection =
            Connection::authenticate(&target, self.index, &self.user, &self.settings.password)
                .await?;
        if let Some(previd) = self.previd.clone() {
            connection
                .send(&format!(
                    "<resume xmlns='{SM}' previd='{previd}' h='{}'/>",
                    self.inbound
                ))
                .await?;
            let answer = connection
                .until(|e| e.has_ns(SM) && matches!(e.name(), "resumed" | "failed"))
                .await?;
            let h = answer.attr("h").and_then(|h| h.parse::<u32>().ok());
            if answer.name() == "resumed" {
                let h = h.context("resumed without h")?;
                self.acknowledged(h);
                self.outbound = h;
                for item in &mut self.unacked {
                    self.outbound = self.outbound.wrapping_add(1);
                    item.index = self.outbound;
                }
                self.ledger.resumed.fetch_add(1, Ordering::Relaxed);
                return Ok(connection);
            }
            if let Some(h) = h {
                self.acknowledged(h);
            }
            self.ledger.resume_failed.fetch_add(1, Ordering::Relaxed);
            self.previd = None;
        }
        connection.keep_messages();
        connection.bind(&self.settings.resource).await?;
        connection
            .send(&format!("<enable xmlns='{SM}' resume='true'/>"))
            .await?;
        let enabled = connection
            .until(|e| e.has_ns(SM) && matches!(e.name(), "enabled" | "failed"))
            .await?;
        // Messages that reached the new session before stream management
        // was on: delivered, and outside its count.
        for message in connection.take_kept() {
            self.arrived(&message);
        }
        if enabled.name() != "enabled" {
            bail!("stream management refused: {}", String::from(&enabled));
        }
        self.previd = enabled.attr("id").map(str::to_owned);
        self.inbound = 0;
        // A new session: old presences and iq answers mean nothing any more;
        // messages the old session may not have taken are sent again.
        self.unacked.retain(|item| item.seq.is_some());
        self.unacked.push_front(Outgoing {
            index: 0,
            xml: "<presence/>".to_owned(),
            seq: None,
        });
        self.outbound = 0;
        for item in &mut self.unacked {
            self.outbound = self.outbound.wrapping_add(1);
            item.index = self.outbound;
        }
        Ok(connection)
    }

    /// Marks everything up to the server's count `h` as acknowledged.
    fn acknowledged(&mut self, h: u32) {
        let mut seqs = Vec::new();
        while let Some(front) = self.unacked.front() {
            // Counts wrap at 2^32: "at or before h" within half the range.
            if h.wrapping_sub(front.index) >= 1 << 31 {
                break;
            }
            if let Some(seq) = self.unacked.pop_front().and_then(|item| item.seq) {
                seqs.push(seq);
            }
        }
        if !seqs.is_empty() {
            self.ledger.record_acknowledged(seqs);
        }
    }

    /// Sends and tracks a stanza.
    async fn send_stanza(
        &mut self,
        sender: &mut Sender,
        xml: String,
        seq: Option<u64>,
    ) -> anyhow::Result<()> {
        self.outbound = self.outbound.wrapping_add(1);
        let result = sender.send(&xml).await;
        self.unacked.push_back(Outgoing {
            index: self.outbound,
            xml,
            seq,
        });
        result
    }

    /// Runs one connection until it ends.
    async fn session(&mut self, connection: Connection) -> End {
        let (mut receiver, mut sender) = connection.split();
        let (elements, mut incoming) = mpsc::channel::<Element>(256);
        let reader = tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                if elements.send(element).await.is_err() {
                    break;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let pending: Vec<String> = self.unacked.iter().map(|item| item.xml.clone()).collect();
        for xml in pending {
            if sender.send(&xml).await.is_err() {
                return End::Lost;
            }
        }
        if sender.send(&format!("<r xmlns='{SM}'/>")).await.is_err() {
            return End::Lost;
        }
        let users = self.settings.users.len();
        let per_user = (self.settings.rate / users as f64).max(0.001);
        let period = Duration::from_secs_f64(1.0 / per_user);
        let offset = period.mul_f64(self.index as f64 / users as f64);
        let mut send_tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        send_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_tick = tokio::time::interval(ACK_INTERVAL);
        let mut acked_inbound = self.inbound;
        let mut redirect = None;
        loop {
            let phase = *self.phase.borrow();
            tokio::select! {
                element = incoming.recv() => {
                    let Some(element) = element else {
                        return redirect.map_or(End::Lost, End::Redirect);
                    };
                    if let Some(error) = StreamError::from_element(&element) {
                        redirect = error.other_host().and_then(|host| host.parse().ok());
                        continue;
                    }
                    if self.handle(&element, &mut sender).await.is_err() {
                        return End::Lost;
                    }
                }
                _ = send_tick.tick(), if phase == Phase::Sending => {
                    let mut to = rand::random_range(0..users);
                    if to == self.index {
                        to = (to + 1) % users;
                    }
                    let to = format!("{}@{}", self.settings.users[to], self.settings.target.domain);
                    let (seq, at) = self.ledger.record_sent(self.index, &to);
                    let xml = format!(
                        "<message to='{to}' type='chat' id='m{seq}'><body>{seq} {}</body></message>",
                        at.as_micros()
                    );
                    if self.send_stanza(&mut sender, xml, Some(seq)).await.is_err() {
                        return End::Lost;
                    }
                }
                _ = ack_tick.tick() => {
                    let mut nonzas = Vec::new();
                    if self.inbound != acked_inbound {
                        nonzas.push(format!("<a xmlns='{SM}' h='{}'/>", self.inbound));
                        acked_inbound = self.inbound;
                    }
                    if !self.unacked.is_empty() {
                        nonzas.push(format!("<r xmlns='{SM}'/>"));
                    }
                    let nonzas: Vec<&str> = nonzas.iter().map(String::as_str).collect();
                    if !nonzas.is_empty() && sender.send_all(&nonzas).await.is_err() {
                        return End::Lost;
                    }
                }
                changed = self.phase.changed() => {
                    if changed.is_err() || *self.phase.borrow() == Phase::Finish {
                        let _ = sender.send(&format!("<a xmlns='{SM}' h='{}'/>", self.inbound)).await;
                        let _ = sender.close().await;
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                            while let Some(element) = incoming.recv().await {
                                if is_stanza(&element) {
                                    self.handle(&element, &mut sender).await.ok();
                                }
                            }
                        })
                        .await;
                        return End::Finished;
                    }
                }
            }
        }
    }

    /// Acts on one element from the server.
    async fn handle(&mut self, element: &Element, sender: &mut Sender) -> anyhow::Result<()> {
        if element.has_ns(SM) {
            match element.name() {
                "r" => {
                    sender
                        .send(&format!("<a xmlns='{SM}' h='{}'/>", self.inbound))
                        .await?
                }
                "a" => {
                    if let Some(h) = element.attr("h").and_then(|h| h.parse().ok()) {
                        self.acknowledged(h);
                    }
                }
                _ => {}
            }
            return Ok(());
        }
        if !is_stanza(element) {
            return Ok(());
        }
        self.inbound = self.inbound.wrapping_add(1);
        match element.name() {
            "message" => self.arrived(element),
            "iq" if matches!(element.attr("type"), Some("get" | "set")) => {
                let id = element.attr("id").unwrap_or_default();
                let to = element
                    .attr("from")
                    .map(|from| format!(" to='{from}'"))
                    .unwrap_or_default();
                let ping = element.get_child("ping", "urn:xmpp:ping").is_some();
                let answer = if ping {
                    format!("<iq type='result' id='{id}'{to}/>")
                } else {
                    format!(
                        "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
                    )
                };
                self.send_stanza(sender, answer, None).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Records a message from the server: a chat message's arrival, or a bounce.
    fn arrived(&self, message: &Element) {
        if message.attr("type") == Some("error") {
            self.ledger.record_bounce();
            return;
        }
        let seq = message
            .get_child("body", CLIENT)
            .and_then(|body| body.text().split(' ').next()?.parse::<u64>().ok());
        if let Some(seq) = seq {
            self.ledger.record_arrival(seq, &self.bare);
        }
    }
}

fn is_stanza(element: &Element) -> bool {
    element.has_ns(CLIENT) && matches!(element.name(), "message" | "presence" | "iq")
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
