//! The gRPC admin service: the same operations as the REST API, over the
//! store. The admin credential is checked by [`super::AdminAuth`] before any
//! method runs. Writes poke the policy bus so this instance publishes at
//! once; other instances learn through the database notification.

use sentinel_shared::proto::admin_server::Admin;
use sentinel_shared::proto::{self as pb};
use sentinel_shared::spec::{BackendSpec, JwtIssuerSpec, PolicySpec, RoleSpec};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::policy_bus::PolicyBus;
use crate::state::AppState;
use crate::store::audit::{AuditFilter, StoredEvent};
use crate::store::keys::{CreatedKey, KeyFilter, NewKey};

pub struct AdminService {
    pub state: AppState,
    pub bus: PolicyBus,
}

type R<T> = Result<Response<T>, Status>;

fn created(c: CreatedKey) -> pb::CreatedApiKey {
    pb::CreatedApiKey {
        key: Some(c.row.to_proto()),
        secret: c.secret,
        policy_version: c.version,
    }
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn stored(e: StoredEvent) -> pb::StoredAuditEvent {
    let StoredEvent {
        event,
        received_at_us,
        chain_ok,
        borders_gaps,
    } = e;
    pb::StoredAuditEvent {
        event: Some(event),
        received_at_us,
        chain_ok,
        borders_gaps: borders_gaps
            .into_iter()
            .map(|(from_seq, to_seq)| pb::SequenceRange { from_seq, to_seq })
            .collect(),
    }
}

/// The audit filter of a gRPC query (0 and "" mean "any").
pub fn filter_of(q: pb::AuditQuery) -> AuditFilter {
    let pb::AuditQuery {
        from_us,
        to_us,
        subject,
        api_key_id,
        role,
        tool,
        backend,
        outcome,
        proxy_id,
        request_id,
        session_id,
        chain_broken_only,
        limit,
        cursor,
        near_gap,
    } = q;
    AuditFilter {
        from_us: (from_us != 0).then_some(from_us),
        to_us: (to_us != 0).then_some(to_us),
        subject: nonempty(subject),
        api_key_id: nonempty(api_key_id),
        role: nonempty(role),
        tool: nonempty(tool),
        backend: nonempty(backend),
        outcome: nonempty(outcome),
        proxy_id: nonempty(proxy_id),
        request_id: nonempty(request_id),
        session_id: nonempty(session_id),
        chain_broken_only,
        near_gap,
        limit: (limit != 0).then_some(limit),
        cursor: nonempty(cursor),
    }
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, Status> {
    v.ok_or_else(|| Status::from(Error::invalid(field, "required")))
}

impl AdminService {
    fn written(&self, version: u64) -> R<pb::PolicyWriteResponse> {
        self.bus.poke();
        Ok(Response::new(pb::PolicyWriteResponse { version }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_api_key(&self, req: Request<pb::CreateApiKeyRequest>) -> R<pb::CreatedApiKey> {
        let pb::CreateApiKeyRequest {
            role,
            owner,
            description,
            expires_at_us,
        } = req.into_inner();
        let c = self
            .state
            .store
            .create_key(NewKey {
                role,
                owner,
                description,
                expires_at_us: (expires_at_us != 0).then_some(expires_at_us),
            })
            .await?;
        self.bus.poke();
        Ok(Response::new(created(c)))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> R<pb::ListApiKeysResponse> {
        let pb::ListApiKeysRequest {
            include_revoked,
            role,
            owner,
        } = req.into_inner();
        let rows = self
            .state
            .store
            .list_keys(&KeyFilter {
                include_revoked,
                role: nonempty(role),
                owner: nonempty(owner),
            })
            .await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: rows.iter().map(|r| r.to_proto()).collect(),
        }))
    }

    async fn get_api_key(&self, req: Request<pb::GetApiKeyRequest>) -> R<pb::ApiKey> {
        let row = self.state.store.get_key(&req.into_inner().id).await?;
        Ok(Response::new(row.to_proto()))
    }

    async fn revoke_api_key(&self, req: Request<pb::RevokeApiKeyRequest>) -> R<pb::ApiKey> {
        let (row, _version) = self.state.store.revoke_key(&req.into_inner().id).await?;
        self.bus.poke();
        Ok(Response::new(row.to_proto()))
    }

    async fn rotate_api_key(&self, req: Request<pb::RotateApiKeyRequest>) -> R<pb::CreatedApiKey> {
        let pb::RotateApiKeyRequest { id, grace_seconds } = req.into_inner();
        let c = self.state.store.rotate_key(&id, grace_seconds).await?;
        self.bus.poke();
        Ok(Response::new(created(c)))
    }

    async fn get_policy(&self, _req: Request<pb::GetPolicyRequest>) -> R<pb::PolicyView> {
        // Version first: the spec read after it is at least that new.
        let version = self.state.store.policy_version().await?;
        let spec = self.state.store.policy_spec().await?.redacted();
        Ok(Response::new(pb::PolicyView {
            version,
            spec: Some((&spec).into()),
        }))
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> R<pb::ApplyPolicyResponse> {
        let pb::ApplyPolicyRequest { spec, dry_run } = req.into_inner();
        let spec = PolicySpec::try_from(required(spec, "spec")?).map_err(Error::from)?;
        let out = self.state.store.apply_policy(spec, dry_run).await?;
        if out.applied {
            self.bus.poke();
        }
        Ok(Response::new(pb::ApplyPolicyResponse {
            version: out.version,
            changes: out.changes,
            applied: out.applied,
        }))
    }

    async fn put_role(&self, req: Request<pb::PutRoleRequest>) -> R<pb::PolicyWriteResponse> {
        let role = RoleSpec::try_from(required(req.into_inner().role, "role")?)
            .map_err(|e| Error::from(e.nest("role")))?;
        let v = self.state.store.put_role(role).await?;
        self.written(v)
    }

    async fn delete_role(&self, req: Request<pb::DeleteRequest>) -> R<pb::PolicyWriteResponse> {
        let v = self.state.store.delete_role(&req.into_inner().name).await?;
        self.written(v)
    }

    async fn put_backend(&self, req: Request<pb::PutBackendRequest>) -> R<pb::PolicyWriteResponse> {
        let b = BackendSpec::from(required(req.into_inner().backend, "backend")?);
        let v = self.state.store.put_backend(b).await?;
        self.written(v)
    }

    async fn delete_backend(&self, req: Request<pb::DeleteRequest>) -> R<pb::PolicyWriteResponse> {
        let v = self
            .state
            .store
            .delete_backend(&req.into_inner().name)
            .await?;
        self.written(v)
    }

    async fn put_jwt_issuer(
        &self,
        req: Request<pb::PutJwtIssuerRequest>,
    ) -> R<pb::PolicyWriteResponse> {
        let i = JwtIssuerSpec::from(required(req.into_inner().issuer, "issuer")?);
        let v = self.state.store.put_jwt_issuer(i).await?;
        self.written(v)
    }

    async fn delete_jwt_issuer(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> R<pb::PolicyWriteResponse> {
        let v = self
            .state
            .store
            .delete_jwt_issuer(&req.into_inner().name)
            .await?;
        self.written(v)
    }

    async fn rotate_session_key(
        &self,
        _req: Request<pb::RotateSessionKeyRequest>,
    ) -> R<pb::PolicyWriteResponse> {
        let v = self.state.store.rotate_session_key().await?;
        self.written(v)
    }

    async fn query_audit(&self, req: Request<pb::AuditQuery>) -> R<pb::AuditPage> {
        let (events, next) = self
            .state
            .store
            .query_audit(&filter_of(req.into_inner()))
            .await?;
        Ok(Response::new(pb::AuditPage {
            events: events.into_iter().map(stored).collect(),
            next_cursor: next.unwrap_or_default(),
        }))
    }

    async fn list_proxies(
        &self,
        _req: Request<pb::ListProxiesRequest>,
    ) -> R<pb::ListProxiesResponse> {
        let stale = std::time::Duration::from_secs(self.state.config.sync.stale_after_secs);
        let rows = self.state.store.list_proxies(stale).await?;
        let policy_version = self.state.store.policy_version().await?;
        Ok(Response::new(pb::ListProxiesResponse {
            proxies: rows.iter().map(|r| r.to_proto()).collect(),
            policy_version,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> R<pb::CreatedJoinToken> {
        let (id, token) = self
            .state
            .store
            .create_join_token(&req.into_inner().description)
            .await?;
        Ok(Response::new(pb::CreatedJoinToken { id, token }))
    }
}
