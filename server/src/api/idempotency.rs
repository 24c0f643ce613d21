//! Idempotent mutations: a request carrying a client's `request_id` runs at most once.
//!
//! The id, the method and the request's encoded body (without the id) are recorded before the
//! work starts. A retry with the same id and body gets the first call's response back: while
//! it runs, by waiting for it (also when twenty callers arrive at once); once it succeeded,
//! from the database (also after a daemon restart). The same id with another method or body
//! is `ALREADY_EXISTS`. A request that failed is forgotten: retrying it runs it again (every
//! operation is all-or-nothing, so nothing of the failed attempt is in the way). A request
//! interrupted by a daemon restart answers `ABORTED` and names what to inspect. Records are
//! kept for [`RETENTION`].

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use prost::Message;
use tokio::sync::{Mutex, watch};
use tonic::{Response, Status, metadata::MetadataValue};

use super::{
    OP_ID_METADATA,
    status::{ApiError, api_status, invalid_field},
};
use crate::{
    clock::Clock,
    store::{RequestLog, StoreError},
};

/// How long a request id is remembered.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest request id accepted.
const MAX_REQUEST_ID: usize = 128;

/// A finished request: its encoded response and operation id, or its error.
type Outcome = Result<(Vec<u8>, Option<String>), Status>;

/// A request in flight in this daemon: what it was, and where its outcome will appear.
struct InFlight {
    method: &'static str,
    body: Vec<u8>,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// The requests this daemon runs or ran, by request id.
#[derive(Clone)]
pub struct Idempotency {
    store: RequestLog,
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

fn store_status(error: StoreError) -> Status {
    api_status(&ApiError::Ops(error.into()))
}

/// Checks a client's request id: up to 128 printable ASCII characters.
fn check_request_id(request_id: &str) -> Result<(), Status> {
    if request_id.len() > MAX_REQUEST_ID || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_field(
            "request_id",
            &format!("must be at most {MAX_REQUEST_ID} printable ASCII characters without spaces (a UUID fits)"),
        ));
    }
    Ok(())
}

fn conflict(request_id: &str, method: &str, first_method: &str) -> Status {
    let first = if first_method == method { format!("{method} with a different request") } else { first_method.into() };
    api_status(&ApiError::RequestIdReused { request_id: request_id.into(), first })
}

fn response_of<T: Message + Default>(outcome: Outcome) -> Result<Response<T>, Status> {
    let (bytes, op_id) = outcome?;
    let message = T::decode(bytes.as_slice())
        .map_err(|e| api_status(&ApiError::Internal { what: "recorded response", detail: e.to_string() }))?;
    let mut response = Response::new(message);
    if let Some(value) = op_id.and_then(|id| MetadataValue::try_from(id).ok()) {
        response.metadata_mut().insert(OP_ID_METADATA, value);
    }
    Ok(response)
}

impl Idempotency {
    /// Requests recorded in `store`.
    pub fn new(store: RequestLog) -> Self {
        Self { store, in_flight: Arc::default() }
    }

    /// Runs `work` for the request `body` of `method` at most once per `request_id` (every
    /// time when it is empty). `work` runs on its own task: a caller that goes away does not
    /// cut it short, and its outcome is recorded for the retry.
    pub async fn run<T, W>(
        &self,
        method: &'static str,
        request_id: &str,
        body: Vec<u8>,
        work: W,
    ) -> Result<Response<T>, Status>
    where
        T: Message + Default + 'static,
        W: Future<Output = Result<Response<T>, Status>> + Send + 'static,
    {
        if request_id.is_empty() {
            return work.await;
        }
        check_request_id(request_id)?;
        let mut waiting = {
            let mut in_flight = self.in_flight.lock().await;
            if let Some(running) = in_flight.get(request_id) {
                if running.method != method || running.body != body {
                    return Err(conflict(request_id, method, running.method));
                }
                running.outcome.clone()
            } else if !self.store.begin(request_id, method, &body).await.map_err(store_status)? {
                let Some(first) = self.store.get(request_id).await.map_err(store_status)? else {
                    return Err(api_status(&ApiError::RequestIdExpiring { request_id: request_id.into() }));
                };
                if first.method != method || first.body != body {
                    return Err(conflict(request_id, method, &first.method));
                }
                return match first.outcome {
                    Some(outcome) => response_of(Ok(outcome)),
                    None => Err(api_status(&ApiError::RequestInterrupted {
                        request_id: request_id.into(),
                        method: method.into(),
                    })),
                };
            } else {
                let (sender, receiver) = watch::channel(None);
                in_flight.insert(request_id.to_owned(), InFlight { method, body, outcome: receiver.clone() });
                let (store, in_flight, request_id) =
                    (self.store.clone(), self.in_flight.clone(), request_id.to_owned());
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let outcome: Outcome = work.await.map(|response| {
                            let op_id = response
                                .metadata()
                                .get(OP_ID_METADATA)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            (response.into_inner().encode_to_vec(), op_id)
                        });
                        let recorded = match &outcome {
                            Ok((bytes, op_id)) => store.done(&request_id, bytes, op_id.as_deref()).await,
                            Err(_) => store.forget(&request_id).await,
                        };
                        if let Err(error) = recorded {
                            tracing::warn!(request_id, error = %error, "cannot record the request's outcome");
                        }
                        // Removed under the lock, after recording: a retry finds it in one place or the other.
                        let mut in_flight = in_flight.lock().await;
                        in_flight.remove(&request_id);
                        let _ = sender.send(Some(outcome));
                    },
                    tracing::Span::current(),
                ));
                receiver
            }
        };
        let outcome = waiting
            .wait_for(Option::is_some)
            .await
            .map_err(|e| api_status(&ApiError::Internal { what: "the request's task", detail: e.to_string() }))?
            .clone()
            .expect("waited for Some");
        response_of(outcome)
    }

    /// Forgets request ids older than [`RETENTION`] by `clock`.
    pub async fn prune(&self, clock: &Clock) -> Result<u64, StoreError> {
        self.store.prune(clock.now_ms() - RETENTION.as_millis() as i64).await
    }
}
