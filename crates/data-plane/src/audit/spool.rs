//! The production audit sink: the durable on-disk spool
//! ([`sentinel_spool`]), shipped to the control plane until acked.

use sentinel_shared::proto::AuditEvent;
use sentinel_spool::{AppendError, Spool};

use super::{AttemptFuture, AttemptTicket, AuditSink, AuditUnavailable};

pub struct SpoolSink(pub Spool);

impl AuditSink for SpoolSink {
    fn attempt<'a>(&'a self, ev: &'a mut AuditEvent) -> AttemptFuture<'a> {
        Box::pin(async move {
            match self.0.attempt_in_place(ev).await {
                // Sequence 0: dropped by the `drop` policy of a full spool;
                // its outcome is ignored.
                Ok(seq) => Ok(AttemptTicket(seq)),
                Err(e @ (AppendError::Full | AppendError::Disk(_) | AppendError::Closed)) => {
                    Err(AuditUnavailable {
                        reason: e.to_string(),
                    })
                }
            }
        })
    }

    fn outcome(&self, ticket: AttemptTicket, ev: AuditEvent) {
        self.0.outcome(ticket.0, ev);
    }

    fn decided(&self, ev: AuditEvent) {
        self.0.whole(ev);
    }
}
