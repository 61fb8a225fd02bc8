//! What happens to an authentic push once it is typed: de-duplication, the account's
//! rule, the record, and the answer — within the reply budget, also when the answer
//! comes from the owner's service.
//!
//! Three paths:
//! - a rule's reply (or none): computed at once, recorded with the push, answered;
//! - a forward in the background (the rule asks for it, or WeChat shows no reply to this
//!   kind of push): recorded together with an outbox entry in one transaction, answered
//!   `success`; the outbox hands it on;
//! - a forward in time: the push is recorded first, then the owner's service is called
//!   in a task of its own. An answer within the budget becomes the passive reply. A late
//!   one, depending on the account's `late_reply`: the delivery is answered `success` and
//!   the reply goes out as a customer-service message; or the delivery is left
//!   unanswered so that WeChat delivers again, and a retry gets the reply when it is
//!   ready (the last delivery gets `success`); or it is dropped.
//!
//! In every path WeChat's retries never run a rule or a forward again: they join the
//! delivery in flight or get the recorded answer.
//!
//! An account that publishes to NATS adds, in every path: in the background, a `nats:`
//! outbox entry written with the record; before the reply, a publish that runs beside
//! the answer, every delivery of the push (JetStream drops the second copy by its
//! `Nats-Msg-Id`). A delivery whose publish fails queues it in the outbox and is refused
//! with 503, so that WeChat delivers again and the retry publishes again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use wxgate_protocol::push::{Event, Kind, PushError};
use wxgate_protocol::{Push, Reply, reply, xml};

use crate::config::{LateReply, Publish};
use crate::dedup::{Answer, Claim, Guard};
use crate::fields;
use crate::forward::{self, ForwardError};
use crate::http::{AccountState, Outcome, Rejection, unix_ms, unix_now};
use crate::nats::{self, Publisher};
use crate::rules::{self, Action};
use crate::store::{Inserted, NewRecord, OutboxEntry, Status, Update};
use crate::wechat_api::ApiError;

/// How often a retry waiting for another node's forward looks at the shared store.
const CLUSTER_POLL: Duration = Duration::from_millis(20);
/// How long a forward may run at all, after which its reply is given up.
const FORWARD_LIMIT: Duration = Duration::from_secs(30);
/// Tries of a customer-service message that failed for a passing reason.
const LATE_SEND_ATTEMPTS: u32 = 3;
/// WeChat's wait for one delivery.
const WECHAT_DEADLINE: Duration = Duration::from_secs(5);

impl AccountState {
    /// De-duplicates, answers and records a typed push; publishes it to NATS before the
    /// answer when the account asks for that.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        push: &Push,
        doc: &str,
        encrypted: bool,
        started: Instant,
    ) -> Result<(Outcome, Answer, &'static str), Rejection> {
        match &self.nats {
            Some(nats) if self.account.publish == Publish::BeforeReply => {
                // Side by side: the ack and the store's commit take their time together.
                // Boxed, as the other rare paths: the task of every push holds its
                // future, and this one would make all of them larger.
                Box::pin(async {
                    let key = push.dedup_key();
                    let (answered, published) = tokio::join!(
                        self.answer(push, doc, encrypted, started),
                        self.publish_now(nats, push, doc, &key, started),
                    );
                    let answered = answered?;
                    published?;
                    Ok(answered)
                })
                .await
            }
            _ => self.answer(push, doc, encrypted, started).await,
        }
    }

    async fn answer(
        self: &Arc<Self>,
        push: &Push,
        doc: &str,
        encrypted: bool,
        started: Instant,
    ) -> Result<(Outcome, Answer, &'static str), Rejection> {
        let kind = push.kind_name();
        let key = push.dedup_key();
        let published = self.background_publish(push, doc, &key);
        let (outcome, answer) = match rules::answer(&self.account.rules, push) {
            Action::Reply(reply) => {
                let xml = self.render(push, &reply);
                self.once(&key, started, || {
                    let outbox = published.into_iter().collect();
                    self.record(push, doc, encrypted, &key, xml, Status::Answered, outbox)
                })
                .await?
            }
            Action::Forward { url, background } if background || !can_reply(push) => {
                let forward = OutboxEntry {
                    url,
                    payload: forward::payload(&self.account.name, &key, push, doc, None),
                };
                self.once(&key, started, || {
                    let outbox = std::iter::once(forward).chain(published).collect();
                    self.record(push, doc, encrypted, &key, None, Status::Answered, outbox)
                })
                .await?
            }
            Action::Forward { url, .. } => {
                let outbox = published.into_iter().collect();
                Box::pin(self.forward_in_time(push, doc, encrypted, &key, &url, outbox, started))
                    .await?
            }
        };
        if let (Outcome::Handled, Kind::Event(Event::UserAuthorization { event, open_id, .. })) =
            (outcome, &push.kind)
        {
            // The follower withdrew their data: delete what we hold of them.
            if event.eq_ignore_ascii_case("user_authorization_revoke") && !open_id.is_empty() {
                let (store, account, openid, key) =
                    (self.store.clone(), self.account.name.clone(), open_id.clone(), key.clone());
                tokio::spawn(async move {
                    // The revoke's own outbox entry stays: the owner's service must hear of it.
                    match store.forget(&account, &openid, Some(&key)).await {
                        Ok(n) => {
                            info!(account = %account, records = n, "follower's records deleted on authorization revoke")
                        }
                        Err(e) => {
                            warn!(account = %account, error = %e, "follower's records not deleted")
                        }
                    }
                });
            }
        }
        Ok((outcome, answer, kind))
    }

    /// The outbox entry that publishes the push to NATS, when the account publishes in
    /// the background.
    fn background_publish(&self, push: &Push, doc: &str, key: &str) -> Option<OutboxEntry> {
        let nats = self.nats.as_ref().filter(|_| self.account.publish == Publish::Background)?;
        Some(OutboxEntry {
            url: format!("{}{}", nats::SCHEME, nats.subject(&self.account.name, push.kind_name())),
            payload: forward::payload(&self.account.name, key, push, doc, None),
        })
    }

    /// Publishes the push and waits for JetStream's ack, within the reply budget. On
    /// failure the publish is queued in the outbox (so that it happens at least once, even
    /// if WeChat gives up) and the delivery is refused, so that WeChat delivers again.
    async fn publish_now(
        &self,
        nats: &Publisher,
        push: &Push,
        doc: &str,
        key: &str,
        started: Instant,
    ) -> Result<(), Rejection> {
        let account = self.account.name.as_str();
        let subject = nats.subject(account, push.kind_name());
        let payload = forward::payload(account, key, push, doc, None);
        let budget =
            (started + self.account.reply_budget).saturating_duration_since(Instant::now());
        let id = nats::msg_id(account, key);
        let body = bytes::Bytes::from(payload.clone());
        let Err(e) =
            nats.publish(account, nats::Via::BeforeReply, &subject, &id, body, budget).await
        else {
            return Ok(());
        };

        let entry = OutboxEntry { url: format!("{}{subject}", nats::SCHEME), payload };
        let queued = self.store.enqueue(account, key, &push.from, entry).await;
        if let nats::PublishError::TooLarge(..) = e {
            // No delivery of it will ever be published: answer it, and let the outbox
            // park the entry where `wxgate outbox list --state dead` shows it.
            error!(account, kind = push.kind_name(), error = %e, "push too large for NATS; answered without publishing, parked in the outbox");
            return Ok(());
        }
        match queued {
            // The outage itself is logged once, by the publisher.
            Ok(()) if matches!(e, nats::PublishError::NotConnected) => {
                debug!(
                    account,
                    kind = push.kind_name(),
                    "publish before the reply waits for NATS; queued in the outbox, the delivery refused"
                );
            }
            Ok(()) => {
                warn!(account, kind = push.kind_name(), error = %e, "publish before the reply failed; queued in the outbox, and the delivery refused so that WeChat delivers again")
            }
            Err(q) => {
                warn!(account, kind = push.kind_name(), error = %e, queue_error = %q, "publish before the reply failed and could not be queued; the delivery refused so that WeChat delivers again")
            }
        }
        Err(Rejection::PublishFailed)
    }

    /// Records an authentic push that could not be understood; it is answered `success`.
    pub(crate) async fn dead_letter(
        &self,
        doc: &str,
        encrypted: bool,
        e: &PushError,
        started: Instant,
    ) -> Result<(Outcome, Answer, &'static str), Rejection> {
        debug!(account = %self.account.name, error = %e, "push kept as dead letter");
        let key = format!("dead:{}", hex::encode(sha1_digest(doc.as_bytes())));
        let root = xml::parse(doc).ok();
        let fields = root.as_ref().map(fields::object).unwrap_or_default();
        // Kept with its sender where one can be read, so that `forget` finds it too.
        let from_user = root.as_ref().and_then(|r| r.text_of("FromUserName")).map(str::to_owned);
        let make = || NewRecord {
            account: self.account.name.clone(),
            dedup_key: key.clone(),
            kind: "dead_letter".into(),
            from_user,
            encrypted,
            xml: doc.to_owned(),
            fields: serde_json::Value::Object(fields).to_string(),
            dead_letter: true,
            error: Some(e.to_string()),
            received_at_ms: unix_ms(),
            ..NewRecord::default()
        };
        let (outcome, answer) = self.once(&key, started, make).await?;
        let outcome =
            if matches!(outcome, Outcome::Handled) { Outcome::DeadLetter } else { outcome };
        Ok((outcome, answer, "dead_letter"))
    }

    /// The reply XML for this push, news cut to WeChat's article limit.
    fn render(&self, push: &Push, reply: &Reply) -> Option<String> {
        let max = reply::max_articles(push);
        let dropped = reply.dropped_articles(max);
        if dropped > 0 {
            warn!(account = %self.account.name, dropped, max, "news reply cut to WeChat's article limit");
        }
        reply.to_xml(&push.from, &push.to, unix_now(), max)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        push: &Push,
        doc: &str,
        encrypted: bool,
        key: &str,
        reply: Option<String>,
        status: Status,
        outbox: Vec<OutboxEntry>,
    ) -> NewRecord {
        NewRecord {
            account: self.account.name.clone(),
            dedup_key: key.to_owned(),
            kind: push.kind_name().to_owned(),
            msg_type: Some(push.msg_type.clone()),
            event: push.event_name().map(str::to_owned),
            from_user: Some(push.from.clone()),
            to_user: Some(push.to.clone()),
            create_time: Some(push.create_time.raw().to_owned()).filter(|c| !c.is_empty()),
            encrypted,
            xml: doc.to_owned(),
            fields: serde_json::Value::Object(fields::of_push(push)).to_string(),
            reply,
            dead_letter: false,
            error: None,
            received_at_ms: unix_ms(),
            status,
            outbox,
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}\u{0}{key}", self.account.name)
    }

    /// Stores `make`'s record at most once per key, joining a delivery in flight or
    /// reusing a recorded answer.
    async fn once(
        &self,
        key: &str,
        started: Instant,
        make: impl FnOnce() -> NewRecord,
    ) -> Result<(Outcome, Answer), Rejection> {
        let full = self.full_key(key);
        let deadline = started + self.account.reply_budget;
        let mut make = Some(make);
        loop {
            match self.dedup.claim(&full) {
                Claim::Done(answer) => {
                    self.store.note_retry(&self.account.name, key);
                    return Ok((Outcome::Duplicate, answer));
                }
                Claim::InFlight(rx, _) => match wait_answer(rx, deadline).await {
                    Waited::Answer(answer) => {
                        self.store.note_retry(&self.account.name, key);
                        return Ok((Outcome::RetryJoined, answer));
                    }
                    // The first delivery failed and released the key: try ourselves.
                    Waited::Released => continue,
                    Waited::TimedOut(_) => return Err(Rejection::StillInFlight),
                },
                Claim::New(guard) => {
                    let Some(make) = make.take() else { return Err(Rejection::StillInFlight) };
                    let record = make();
                    let reply = record.reply.clone();
                    let (outcome, reply) = match self.store.insert(record).await? {
                        Inserted::New => (Outcome::Handled, reply),
                        Inserted::Existing { reply, .. } => (Outcome::Duplicate, reply),
                    };
                    let answer = Answer { reply: reply.map(Arc::from) };
                    guard.finish(answer.clone());
                    return Ok((outcome, answer));
                }
            }
        }
    }

    /// Forwards the push and answers with the service's reply if it comes within the
    /// budget; see the module doc for what happens when it does not. `outbox` goes with
    /// the record.
    #[allow(clippy::too_many_arguments)]
    async fn forward_in_time(
        self: &Arc<Self>,
        push: &Push,
        doc: &str,
        encrypted: bool,
        key: &str,
        url: &str,
        outbox: Vec<OutboxEntry>,
        started: Instant,
    ) -> Result<(Outcome, Answer), Rejection> {
        let full = self.full_key(key);
        let deadline = started + self.account.reply_budget;
        let mut outbox = Some(outbox);
        loop {
            match self.dedup.claim(&full) {
                Claim::Done(answer) => {
                    self.store.note_retry(&self.account.name, key);
                    return Ok((Outcome::Duplicate, answer));
                }
                Claim::InFlight(rx, joins) => {
                    self.store.note_retry(&self.account.name, key);
                    match wait_answer(rx, deadline).await {
                        Waited::Answer(answer) => return Ok((Outcome::RetryJoined, answer)),
                        Waited::Released => continue,
                        Waited::TimedOut(rx) => return self.still_waiting(&full, joins, rx).await,
                    }
                }
                Claim::New(guard) => {
                    // Durable first: the push is kept even if the service never answers.
                    let outbox = outbox.take().unwrap_or_default();
                    let record =
                        self.record(push, doc, encrypted, key, None, Status::Forwarding, outbox);
                    // New, or an earlier forward failed or was cut short by a restart:
                    // forward (again). Answered before: that answer.
                    match self.store.insert(record).await? {
                        Inserted::Existing { status: Status::Answered | Status::Late, reply } => {
                            let answer = Answer { reply: reply.map(Arc::from) };
                            guard.finish(answer.clone());
                            return Ok((Outcome::Duplicate, answer));
                        }
                        // Several nodes share the store: the forward runs on another one.
                        Inserted::Existing { status: Status::Forwarding, .. }
                            if self.store.shared() =>
                        {
                            match self.join_other_node(guard, key, deadline).await {
                                Some(result) => return result,
                                // That forward failed: try ourselves.
                                None => continue,
                            }
                        }
                        _ => {}
                    }
                    let rx = guard.subscribe();
                    let job = ForwardJob {
                        state: self.clone(),
                        url: url.to_owned(),
                        key: key.to_owned(),
                        payload: forward::payload(
                            &self.account.name,
                            key,
                            push,
                            doc,
                            Some(epoch_ms(deadline)),
                        ),
                        from: push.from.clone(),
                        to: push.to.clone(),
                        max_articles: reply::max_articles(push),
                        deadline,
                        started,
                    };
                    tokio::spawn(job.run(guard));
                    return match wait_answer(rx, deadline).await {
                        // `success` at the budget means the reply will come another way.
                        Waited::Answer(answer)
                            if answer.reply.is_none() && Instant::now() >= deadline =>
                        {
                            Ok((Outcome::Late, answer))
                        }
                        Waited::Answer(answer) => Ok((Outcome::Handled, answer)),
                        Waited::Released => Err(Rejection::ForwardFailed),
                        Waited::TimedOut(rx) => self.still_waiting(&full, 0, rx).await,
                    };
                }
            }
        }
    }

    /// A retry of a push whose forward runs on another node (the store is shared): waits
    /// for that node to record the answer, until the budget. `None` when that forward
    /// failed, so that this delivery forwards again.
    async fn join_other_node(
        &self,
        guard: Guard,
        key: &str,
        deadline: Instant,
    ) -> Option<Result<(Outcome, Answer), Rejection>> {
        let mut deliveries = 0;
        loop {
            let (store, account, k) =
                (self.store.clone(), self.account.name.clone(), key.to_owned());
            let standing = tokio::task::spawn_blocking(move || store.answer_of(&account, &k)).await;
            if let Ok(Ok(Some(standing))) = standing {
                deliveries = standing.deliveries;
                let reply = standing.reply.map(Arc::from);
                match standing.status {
                    Status::Answered => {
                        let answer = Answer { reply };
                        guard.finish(answer.clone());
                        return Some(Ok((Outcome::RetryJoined, answer)));
                    }
                    // The reply goes (went) as a customer-service message.
                    Status::Late => {
                        let answer = Answer { reply: None };
                        guard.finish(answer.clone());
                        return Some(Ok((Outcome::Late, answer)));
                    }
                    Status::Failed => return None,
                    Status::Forwarding => {}
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep_until((Instant::now() + CLUSTER_POLL).min(deadline).into()).await;
        }
        // Not answered in time. Holding for a retry: refuse, unless WeChat is done
        // delivering. The node running the forward keeps the reply.
        drop(guard);
        let hold = self.account.late_reply == LateReply::HoldForRetry;
        if hold && deliveries < i64::from(self.account.wechat_attempts) {
            return Some(Err(Rejection::StillInFlight));
        }
        Some(Ok((Outcome::Late, Answer { reply: None })))
    }

    /// A delivery whose answer is not ready at its budget. Holding for a retry: refuse it
    /// (503) so that WeChat delivers again — unless it is WeChat's last delivery, which
    /// gets `success` (and the reply, when it comes, is treated as late).
    ///
    /// Deciding that the follower gets nothing is done under the `gave_up` lock, which
    /// the forward job also takes before it publishes a reply: a reply that lands at the
    /// very deadline is either given to this delivery or sent the late way, never lost.
    async fn still_waiting(
        &self,
        full_key: &str,
        joins: u32,
        rx: tokio::sync::watch::Receiver<Option<Answer>>,
    ) -> Result<(Outcome, Answer), Rejection> {
        {
            let mut fates = self.fates.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(answer) = rx.borrow().clone() {
                let outcome =
                    if answer.reply.is_none() { Outcome::Late } else { Outcome::RetryJoined };
                return Ok((outcome, answer));
            }
            if fates.get(full_key) != Some(&Fate::Publishing) {
                let hold = self.account.late_reply == LateReply::HoldForRetry;
                if hold && joins + 1 < self.account.wechat_attempts {
                    return Err(Rejection::StillInFlight);
                }
                // The forward job still holds the push; tell it the follower got nothing.
                fates.insert(full_key.to_owned(), Fate::GaveUp);
                return Ok((Outcome::Late, Answer { reply: None }));
            }
        }
        // The reply came in time and is being recorded: it is this delivery's.
        match wait_answer(rx, Instant::now() + Duration::from_secs(2)).await {
            Waited::Answer(answer) => Ok((Outcome::RetryJoined, answer)),
            Waited::Released | Waited::TimedOut(_) => Err(Rejection::StillInFlight),
        }
    }
}

/// What became of a forward whose reply raced its deadline; decided under one lock by
/// the forward job and the deliveries waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// A delivery answered `success`: the reply, when it comes, goes the late way.
    GaveUp,
    /// The reply came in time and is being recorded before it is handed over.
    Publishing,
}

/// What waiting for a delivery in flight gave.
enum Waited {
    Answer(Answer),
    Released,
    /// Not answered by the deadline; the receiver, to look once more under the lock.
    TimedOut(tokio::sync::watch::Receiver<Option<Answer>>),
}

async fn wait_answer(
    mut rx: tokio::sync::watch::Receiver<Option<Answer>>,
    deadline: Instant,
) -> Waited {
    let waited = tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some))
        .await
        .map(|r| r.map(|answer| answer.clone().unwrap_or(Answer { reply: None })));
    match waited {
        Ok(Ok(answer)) => Waited::Answer(answer),
        Ok(Err(_)) => Waited::Released,
        Err(_) => Waited::TimedOut(rx),
    }
}

/// A forward running on its own, owning the right to answer the push.
struct ForwardJob {
    state: Arc<AccountState>,
    url: String,
    key: String,
    payload: String,
    from: String,
    to: String,
    max_articles: usize,
    deadline: Instant,
    started: Instant,
}

impl ForwardJob {
    async fn run(self, guard: Guard) {
        let s = &self.state;
        let Some(secret) = s.account.forward_secret.clone() else { return };
        let call =
            forward::call(&s.client, &self.url, &secret, &self.key, &self.payload, FORWARD_LIMIT);
        tokio::pin!(call);

        // Within the budget: the reply is the passive reply.
        let mut guard = Some(guard);
        let result = match tokio::time::timeout_at(self.deadline.into(), &mut call).await {
            Ok(result) => result,
            Err(_) => {
                if s.account.late_reply != LateReply::HoldForRetry {
                    // WeChat gets `success` now; the reply, if any, goes another way.
                    let _decided = s.fates.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(g) = guard.take() {
                        g.finish(Answer { reply: None });
                    }
                }
                // Holding: wait as long as WeChat may still deliver again.
                let hold = self.started + WECHAT_DEADLINE * s.account.wechat_attempts;
                let limit = if guard.is_some() { hold } else { self.started + FORWARD_LIMIT };
                tokio::time::timeout_at(limit.into(), &mut call).await.unwrap_or_else(|_| {
                    Err(ForwardError::Transport(format!(
                        "no answer within {:?}",
                        limit - self.started
                    )))
                })
            }
        };

        let full = s.full_key(&self.key);
        match result {
            Ok(reply) => {
                let xml = reply.to_xml(&self.from, &self.to, unix_now(), self.max_articles);
                // Publish the reply only if no delivery gave up on it meanwhile; both
                // decisions are taken under the same lock. It is recorded before it is
                // handed over, like every reply.
                let publish = guard.is_some() && {
                    let mut fates = s.fates.lock().unwrap_or_else(|p| p.into_inner());
                    if fates.get(&full) == Some(&Fate::GaveUp) {
                        fates.remove(&full);
                        false
                    } else {
                        fates.insert(full.clone(), Fate::Publishing);
                        true
                    }
                };
                if publish {
                    let update = self.update(xml.clone(), Status::Answered, None);
                    if let Err(e) = s.store.update(update).await {
                        warn!(account = %s.account.name, error = %e, "forward reply not recorded");
                    }
                    // Handed over under the lock, so no delivery gives up in between.
                    let mut fates = s.fates.lock().unwrap_or_else(|p| p.into_inner());
                    fates.remove(&full);
                    if let Some(g) = guard.take() {
                        g.finish(Answer { reply: xml.map(Arc::from) });
                    }
                    drop(fates);
                } else {
                    self.late(reply, xml).await;
                }
            }
            Err(e) => {
                warn!(account = %s.account.name, url = %self.url, error = %e, "forward failed");
                if let ForwardError::Status { body, .. } = &e {
                    debug!(account = %s.account.name, body = %body, "the service's error answer");
                }
                let gave_up = s.fates.lock().unwrap_or_else(|p| p.into_inner()).remove(&full)
                    == Some(Fate::GaveUp);
                if guard.is_some() && !gave_up {
                    // WeChat has no answer yet: with the guard dropped here, its next
                    // delivery of this push forwards again.
                    let _ = s.store.update(self.update(None, Status::Failed, None)).await;
                    return;
                }
                // WeChat was answered `success`, so no retry will come: the owner's
                // service still gets the push, through the outbox.
                let entry = OutboxEntry {
                    url: self.url.clone(),
                    payload: background_payload(&self.payload),
                };
                let queued = s.store.enqueue(&s.account.name, &self.key, &self.from, entry).await;
                let result = match queued {
                    Ok(()) => format!("forward failed ({e}); queued for background delivery"),
                    Err(q) => format!("forward failed ({e}); not queued: {q}"),
                };
                let _ = s.store.update(self.update(None, Status::Late, Some(result))).await;
            }
        }
    }

    /// A reply that missed its delivery.
    async fn late(&self, reply: Reply, xml: Option<String>) {
        let s = &self.state;
        if reply == Reply::None {
            let _ = s.store.update(self.update(None, Status::Late, Some("no reply".into()))).await;
            return;
        }
        let result = match (&s.api, s.account.late_reply) {
            (Some(api), LateReply::CustomerService | LateReply::HoldForRetry) => {
                // Passing failures (no answer, errcode -1 "system busy") are tried again
                // a few times; quota and other refusals are final.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match api.send_custom(&self.from, &reply).await {
                        Ok(()) => break "sent as a customer-service message".to_owned(),
                        Err(e @ (ApiError::Transport(_) | ApiError::Api { code: -1, .. }))
                            if attempt < LATE_SEND_ATTEMPTS =>
                        {
                            debug!(account = %s.account.name, error = %e, attempt, "late reply not sent yet; trying again");
                            tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                        }
                        Err(e) => {
                            warn!(account = %s.account.name, error = %e, attempt, "late reply not sent");
                            break format!(
                                "customer-service message failed after {attempt} attempt(s): {e}"
                            );
                        }
                    }
                }
            }
            _ => "dropped: not ready in time".to_owned(),
        };
        info!(account = %s.account.name, result = %result, "late reply");
        let _ = s.store.update(self.update(xml, Status::Late, Some(result))).await;
    }

    fn update(&self, reply: Option<String>, status: Status, late_result: Option<String>) -> Update {
        Update {
            account: self.state.account.name.clone(),
            dedup_key: self.key.clone(),
            reply,
            status,
            late_result,
        }
    }
}

/// The payload of a forward sent again in the background: no reply deadline any more.
fn background_payload(payload: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(mut v) => {
            v["reply_deadline_unix_ms"] = serde_json::Value::Null;
            v.to_string()
        }
        Err(_) => payload.to_owned(),
    }
}

/// Whether WeChat shows a passive reply to this push at all (protocol.md §8.4); those
/// that it does not are forwarded in the background.
pub(crate) fn can_reply(push: &Push) -> bool {
    match &push.kind {
        Kind::Message(_) => true,
        Kind::Event(e) => matches!(
            e,
            Event::Subscribe { .. }
                | Event::Scan { .. }
                | Event::Click { .. }
                | Event::ScancodePush { .. }
                | Event::ScancodeWaitmsg { .. }
                | Event::Pictures { .. }
                | Event::LocationSelect { .. }
        ),
    }
}

fn epoch_ms(at: Instant) -> i64 {
    unix_ms() + at.saturating_duration_since(Instant::now()).as_millis() as i64
}

fn sha1_digest(data: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(data).into()
}
