//! Held calls as tasks (2025-11-25 `tasks/*`): a `tools/call` a rule holds for review, sent by
//! a client that asked for a task (`params.task`), is answered at once with a task of the
//! gateway's own (`working`, its status message naming the hold). The call waits for its
//! review in the background, up to the review's timeout rather than `hold_wait`: approved, it
//! runs (as a plain call) and the task completes with its masked result; denied or expired,
//! the task fails with the error naming the review; cancelled, its review is withdrawn.
//! `tasks/get`, `tasks/result` and `tasks/cancel` of such a task are answered here; whose task
//! it is was checked before.
//!
//! A task lives for its `ttl` from creation (the client's, at most [`MAX_TTL`]; without one,
//! the review's timeout plus [`KEEP_RESULT`]), as the specification lets a receiver: past it
//! the task is forgotten (`tasks/get` answers "task not found"), and a task still held when its
//! ttl runs out is cancelled, which withdraws its review: nothing runs for a task the client
//! can no longer see.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tollgate_gate::rules::Decision;
use tollgate_mask::BodyPlan;

use super::{held, json_answer, jsonrpc, messages_of, Exchange, Judged, Replies};
use crate::upstream::UpstreamBody;

/// The prefix of the ids of the gateway's own tasks.
const PREFIX: &str = "tollgate-task-";
/// How often clients are asked to poll a held task.
const POLL_MS: u64 = 2000;
/// Most tasks kept; past it the finished ones are forgotten.
const MAX_TASKS: usize = 10_000;
/// The longest ttl granted, whatever a client asks.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Without a ttl from the client, how long a task is kept after its review's timeout.
const KEEP_RESULT: Duration = Duration::from_secs(3600);

/// The gateway's own tasks, by id.
#[derive(Default)]
pub(crate) struct HeldTasks(Mutex<HashMap<String, Arc<HeldTask>>>);

pub(crate) struct HeldTask {
    created: String,
    /// The ttl granted, in milliseconds (what `tasks/get` shows).
    ttl: u64,
    /// When the ttl runs out.
    expires: tokio::time::Instant,
    state: watch::Sender<State>,
}

#[derive(Clone)]
struct State {
    status: &'static str,
    message: String,
    updated: String,
    /// The call's answer (a result or an error) once the task is done.
    answer: Option<Value>,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl HeldTask {
    fn expired(&self) -> bool {
        tokio::time::Instant::now() >= self.expires
    }

    fn set(&self, status: &'static str, message: String, answer: Option<Value>) {
        self.state.send_modify(|s| {
            if s.status == "working" {
                *s = State {
                    status,
                    message,
                    updated: now(),
                    answer,
                };
            }
        });
    }

    /// The task as `tasks/get` shows it.
    fn view(&self, id: &str) -> Value {
        let s = self.state.borrow();
        let mut t = json!({
            "taskId": id,
            "status": s.status,
            "statusMessage": s.message,
            "createdAt": self.created,
            "lastUpdatedAt": s.updated,
            "ttl": self.ttl,
        });
        if s.status == "working" {
            t["pollInterval"] = POLL_MS.into();
        }
        t
    }
}

impl HeldTasks {
    /// The task `id`, unless its ttl has run out (then it is forgotten).
    fn get(&self, id: &str) -> Option<Arc<HeldTask>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let task = m.get(id)?;
        if task.expired() {
            m.remove(id);
            return None;
        }
        Some(task.clone())
    }

    fn add(&self, id: &str, task: Arc<HeldTask>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_TASKS {
            m.retain(|_, t| !t.expired() && t.state.borrow().status == "working");
        }
        m.insert(id.to_string(), task);
    }

    /// Whether `id` names one of the gateway's own tasks.
    pub(crate) fn owns(&self, id: &str) -> bool {
        id.starts_with(PREFIX) && self.get(id).is_some()
    }
}

/// Whether the judged body is one held `tools/call` whose client asked for a task.
pub(super) fn wants_task(judged: &[Judged]) -> bool {
    matches!(judged, [j] if j.msg.method == "tools/call"
        && j.msg.task
        && matches!(j.judgement.decision, Decision::Review { .. }))
}

/// Answers the held call with a new task and waits for its review in the background.
pub(super) fn hold_as_task(
    x: Exchange,
    judged: Vec<Judged>,
    audit_plan: Option<BodyPlan>,
) -> Response<UpstreamBody> {
    let mut b = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    let id = format!("{PREFIX}{}", hex::encode(b));
    let Decision::Review { rule, timeout, .. } = judged[0].judgement.decision.clone() else {
        unreachable!("wants_task checked it")
    };
    let created = now();
    let ttl = match judged[0].msg.task_ttl {
        Some(ms) => Duration::from_millis(ms).min(MAX_TTL),
        None => (timeout + KEEP_RESULT).min(MAX_TTL),
    };
    let task = Arc::new(HeldTask {
        created: created.clone(),
        ttl: ttl.as_millis() as u64,
        expires: tokio::time::Instant::now() + ttl,
        state: watch::Sender::new(State {
            status: "working",
            message: format!("held for review (rule \"{rule}\"): it runs once an approver approves it (`tollgate reviews list`)"),
            updated: created,
            answer: None,
        }),
    });
    let resource = x.target.resource.name.clone();
    x.gw.mcp_held_tasks.add(&id, task.clone());
    x.gw.mcp_tasks
        .bind(&resource, &id, &x.who.principal.to_string());
    let answer = result_response(judged[0].msg.id.as_ref(), json!({"task": task.view(&id)}));
    let r = json_answer(StatusCode::OK, &answer);
    let call_id = judged[0].msg.id.clone();
    let mut x = x;
    tokio::spawn(async move {
        let reviewed = [&judged[0]];
        // The review decides within its timeout; a little more lets its expiry be seen.
        let wait = timeout + Duration::from_secs(5);
        // A cancelled task drops the hold, which withdraws its review.
        let mut state = task.state.subscribe();
        let outcome = tokio::select! {
            r = held(&x, &reviewed, audit_plan.as_ref(), wait) => r,
            _ = state.wait_for(|s| s.status == "cancelled") => return,
            _ = tokio::time::sleep_until(task.expires) => {
                let m = format!(
                    "the task's ttl of {} ms ran out before its review was decided: the call will not run",
                    task.ttl
                );
                let error = jsonrpc::error_response(None, jsonrpc::NOT_APPROVED, &m, None);
                task.set("cancelled", m, Some(error));
                return;
            }
        };
        if let Err((message, review)) = outcome {
            let data = json!({"rule": rule, "review": review, "session": x.session.log.id});
            let error = jsonrpc::error_response(
                call_id.as_ref(),
                jsonrpc::NOT_APPROVED,
                &message,
                Some(data),
            );
            task.set("failed", message, Some(error));
            return;
        }
        if task.state.borrow().status != "working" {
            return;
        }
        // The server is asked for the plain call: the task is the gateway's.
        let mut body: Value = serde_json::from_slice(&x.body).unwrap_or_default();
        if let Some(p) = body.get_mut("params").and_then(Value::as_object_mut) {
            p.remove("task");
        }
        x.body = body.to_string().into();
        x.parts.headers.remove(hyper::header::CONTENT_LENGTH);
        let answer = run(&x, &judged[0]).await;
        let failed = answer.get("error").is_some();
        let message = if failed {
            "the call failed"
        } else {
            "the call ran"
        };
        task.set(
            if failed { "failed" } else { "completed" },
            message.into(),
            Some(answer),
        );
    });
    r
}

/// Forwards the approved call and reads its (masked, recorded) answer.
async fn run(x: &Exchange, j: &Judged) -> Value {
    let id = j.msg.id.clone().unwrap_or_default();
    let pending = HashMap::from([(id.to_string(), (j.msg.method.clone(), j.msg.name.clone()))]);
    let r = super::forward(x, Replies::new(x, pending)).await;
    let failed = |why: &str| jsonrpc::error_response(Some(&id), jsonrpc::UNAVAILABLE, why, None);
    let Ok(bytes) = r.into_body().collect().await.map(|c| c.to_bytes()) else {
        return failed("the MCP server's answer broke off");
    };
    messages_of(&bytes)
        .into_iter()
        .find(|m| m.get("id") == Some(&id) && m.get("method").is_none())
        .unwrap_or_else(|| failed("the MCP server did not answer the call"))
}

/// `tasks/get`, `tasks/result` or `tasks/cancel` of one of the gateway's tasks.
pub(super) async fn answer(x: &Exchange, msg: &jsonrpc::ClientMessage) -> Value {
    let id = msg.task_id.as_deref().unwrap_or_default();
    let Some(task) = x.gw.mcp_held_tasks.get(id) else {
        return jsonrpc::error_response(
            msg.id.as_ref(),
            jsonrpc::INVALID_PARAMS,
            "task not found",
            None,
        );
    };
    match msg.method.as_str() {
        "tasks/result" => {
            let mut rx = task.state.subscribe();
            let done = rx.wait_for(|s| s.answer.is_some()).await.map(|s| s.clone());
            let Ok(State {
                answer: Some(mut a),
                ..
            }) = done
            else {
                return jsonrpc::error_response(
                    msg.id.as_ref(),
                    jsonrpc::UNAVAILABLE,
                    "the task ended without an answer",
                    None,
                );
            };
            a["id"] = msg.id.clone().unwrap_or_default();
            if let Some(r) = a.get_mut("result").and_then(Value::as_object_mut) {
                let meta = r.entry("_meta").or_insert_with(|| json!({}));
                meta["io.modelcontextprotocol/related-task"] = json!({"taskId": id});
            }
            a
        }
        "tasks/cancel" => {
            if task.state.borrow().status != "working" {
                let m = format!("task {id} has finished and cannot be cancelled");
                return jsonrpc::error_response(msg.id.as_ref(), jsonrpc::INVALID_PARAMS, &m, None);
            }
            let m = "cancelled by the client: the call will not run".to_string();
            let error = jsonrpc::error_response(None, jsonrpc::NOT_APPROVED, &m, None);
            task.set("cancelled", m, Some(error));
            result_response(msg.id.as_ref(), task.view(id))
        }
        _ => result_response(msg.id.as_ref(), task.view(id)),
    }
}

fn result_response(id: Option<&Value>, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}
