//! The control plane's gRPC surfaces over real sockets, against a real
//! Postgres: policy sync (snapshot, deltas, acks, two instances on one
//! database), audit ingest (ack after commit, replays), the admin service
//! and its credential, health and reflection.

#![allow(clippy::unwrap_used)] // a test fails loudly on any surprise

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sentinel_control_plane::config::Config;
use sentinel_control_plane::server::{self, Listeners};
use sentinel_control_plane::testing::TestDb;
use sentinel_shared::proto::admin_client::AdminClient;
use sentinel_shared::proto::audit_ingest_client::AuditIngestClient;
use sentinel_shared::proto::policy_sync_client::PolicySyncClient;
use sentinel_shared::proto::{self as pb, control_message, ingest_request, proxy_message};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

const ADMIN: &str = "admin-token-for-tests-0123456789";
const JOIN: &str = "join-token-for-tests-0123456789";

struct Cp {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_cp(db: &TestDb, name: &str) -> Cp {
    let mut config = Config {
        database_url: db.url.clone(),
        instance_id: name.into(),
        admin_tokens: vec![ADMIN.into()],
        join_tokens: vec![JOIN.into()],
        ..Config::default()
    };
    config.sync.reload_interval_secs = 3600; // only notifications count
    config.finish().unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = Cp {
        grpc: grpc.local_addr().unwrap(),
        http: http.local_addr().unwrap(),
        shutdown: CancellationToken::new(),
    };
    let shutdown = cp.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = server::run(config, Listeners { grpc, http }, None, shutdown).await {
            panic!("control plane failed: {e}");
        }
    });
    // Ready when the gRPC port answers health.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{}", cp.grpc))
            .unwrap()
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn admin_req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

/// A proxy's end of the sync stream.
struct SyncPeer {
    tx: mpsc::Sender<pb::ProxyMessage>,
    rx: tonic::Streaming<pb::ControlMessage>,
}

impl SyncPeer {
    async fn connect(
        addr: SocketAddr,
        proxy_id: &str,
        token: &str,
    ) -> Result<SyncPeer, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::ProxyMessage {
            msg: Some(proxy_message::Msg::Hello(pb::Hello {
                proxy_id: proxy_id.into(),
                build_version: "test-1".into(),
                join_token: token.into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut client = PolicySyncClient::new(channel(addr).await);
        let rx = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        Ok(SyncPeer { tx, rx })
    }

    async fn next(&mut self) -> control_message::Msg {
        let m = tokio::time::timeout(Duration::from_secs(5), self.rx.next())
            .await
            .expect("a policy message within 5 s")
            .expect("stream open")
            .expect("no error");
        m.msg.expect("message body")
    }

    async fn send(&self, m: proxy_message::Msg) {
        self.tx
            .send(pb::ProxyMessage { msg: Some(m) })
            .await
            .unwrap();
    }
}

fn version_of(m: &control_message::Msg) -> u64 {
    match m {
        control_message::Msg::Snapshot(s) => s.version,
        control_message::Msg::Delta(d) => d.version,
    }
}

async fn put_dev_role(admin: &mut AdminClient<Channel>) -> u64 {
    admin
        .put_role(admin_req(pb::PutRoleRequest {
            role: Some(pb::Role {
                name: "dev".into(),
                allow_tools: vec!["*".into()],
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
        .version
}

#[tokio::test]
async fn snapshot_on_connect_then_each_change_as_a_delta() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut peer = SyncPeer::connect(cp.grpc, "proxy-1", JOIN).await.unwrap();
    let first = peer.next().await;
    let control_message::Msg::Snapshot(snap) = &first else {
        panic!("first message must be a snapshot")
    };
    assert!(
        !snap.session_keys.is_empty(),
        "a session key exists from the start"
    );

    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let v_role = put_dev_role(&mut admin).await;
    let m = peer.next().await;
    assert_eq!(version_of(&m), v_role);

    let created = admin
        .create_api_key(admin_req(pb::CreateApiKeyRequest {
            role: "dev".into(),
            owner: "alice".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let returned = Instant::now();
    let key_id = created.key.as_ref().unwrap().id.clone();
    let m = peer.next().await;
    let control_message::Msg::Delta(d) = &m else {
        panic!("expected a delta, got {m:?}")
    };
    assert_eq!(d.version, created.policy_version);
    assert_eq!(d.base_version, v_role);
    assert_eq!(
        d.upsert_keys
            .iter()
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>(),
        vec![key_id.as_str()]
    );
    // The secret travels only to the admin, once; the proxy gets a hash.
    assert_ne!(d.upsert_keys[0].hash, created.secret.as_bytes());

    admin
        .revoke_api_key(admin_req(pb::RevokeApiKeyRequest { id: key_id.clone() }))
        .await
        .unwrap();
    let revoked = Instant::now();
    let m = peer.next().await;
    let revoke_latency = revoked.elapsed();
    let control_message::Msg::Delta(d) = &m else {
        panic!("expected a delta")
    };
    assert_eq!(d.removed_key_ids, vec![key_id]);
    println!(
        "create->delta {:?} (incl. revoke round trip), revoke->delta {:?}",
        returned.elapsed(),
        revoke_latency
    );
    // Generous bound: the figure itself comes from the benchmark.
    assert!(revoke_latency < Duration::from_secs(1));
}

#[tokio::test]
async fn acks_rejects_and_heartbeats_show_in_the_fleet_view() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut peer = SyncPeer::connect(cp.grpc, "proxy-7", JOIN).await.unwrap();
    let v = version_of(&peer.next().await);
    peer.send(proxy_message::Msg::Ack(pb::PolicyAck { version: v }))
        .await;
    peer.send(proxy_message::Msg::Heartbeat(pb::Heartbeat {
        stats: Some(pb::ProxyStats {
            audit_backlog: 42,
            open_sessions: 3,
            ..Default::default()
        }),
    }))
    .await;
    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let v2 = put_dev_role(&mut admin).await;
    assert_eq!(version_of(&peer.next().await), v2);
    peer.send(proxy_message::Msg::Reject(pb::PolicyReject {
        version: v2,
        reason: "backend x: stdio command 'y' not configured here".into(),
        resync: true,
    }))
    .await;
    // resync: the whole snapshot comes again.
    let m = peer.next().await;
    assert!(matches!(m, control_message::Msg::Snapshot(ref s) if s.version == v2));

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fleet = admin
            .list_proxies(admin_req(pb::ListProxiesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let p = fleet
            .proxies
            .iter()
            .find(|p| p.proxy_id == "proxy-7")
            .expect("proxy listed");
        if p.acked_version == v
            && p.rejected_version == v2
            && p.stats.as_ref().is_some_and(|s| s.audit_backlog == 42)
        {
            assert!(p.connected);
            assert_eq!(p.build_version, "test-1");
            assert_eq!(p.control_plane_id, "cp-a");
            assert!(p.reject_reason.contains("not configured"));
            assert_eq!(fleet.policy_version, v2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fleet view never showed ack/reject/heartbeat: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(peer);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fleet = admin
            .list_proxies(admin_req(pb::ListProxiesRequest {}))
            .await
            .unwrap()
            .into_inner();
        if fleet
            .proxies
            .iter()
            .any(|p| p.proxy_id == "proxy-7" && !p.connected)
        {
            break;
        }
        assert!(Instant::now() < deadline, "disconnect not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_change_through_one_instance_reaches_proxies_of_another() {
    let db = TestDb::new().await;
    let a = start_cp(&db, "cp-a").await;
    let b = start_cp(&db, "cp-b").await;
    let mut on_b = SyncPeer::connect(b.grpc, "proxy-b", JOIN).await.unwrap();
    let v0 = version_of(&on_b.next().await);
    let mut admin_a = AdminClient::new(channel(a.grpc).await);
    let mut last = v0;
    for i in 0..5 {
        let v = admin_a
            .put_role(admin_req(pb::PutRoleRequest {
                role: Some(pb::Role {
                    name: "dev".into(),
                    description: format!("rev {i}"),
                    allow_tools: vec!["*".into()],
                    ..Default::default()
                }),
            }))
            .await
            .unwrap()
            .into_inner()
            .version;
        let started = Instant::now();
        let m = on_b.next().await;
        println!(
            "change on cp-a reached a proxy of cp-b in {:?}",
            started.elapsed()
        );
        assert_eq!(version_of(&m), v);
        assert!(v > last);
        last = v;
    }
}

#[tokio::test]
async fn proxies_and_admins_must_authenticate() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let err = SyncPeer::connect(cp.grpc, "proxy-1", "wrong-token-0123456789")
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("join_token"), "{err}");
    let err = SyncPeer::connect(cp.grpc, "bad id with spaces", JOIN)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("proxy_id"), "{err}");

    // A join token made through the admin API works; it is shown once.
    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let jt = admin
        .create_join_token(admin_req(pb::CreateJoinTokenRequest {
            description: "rack 4".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut peer = SyncPeer::connect(cp.grpc, "proxy-2", &jt.token)
        .await
        .unwrap();
    assert!(matches!(
        peer.next().await,
        control_message::Msg::Snapshot(_)
    ));

    let err = admin
        .list_api_keys(Request::new(pb::ListApiKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut wrong = Request::new(pb::ListApiKeysRequest::default());
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-admin-token-xx".parse().unwrap(),
    );
    assert_eq!(
        admin.list_api_keys(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
}

#[tokio::test]
async fn admin_errors_name_the_field_and_secrets_are_shown_once() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let err = admin
        .put_role(admin_req(pb::PutRoleRequest {
            role: Some(pb::Role {
                name: "ops".into(),
                allow_tools: vec!["ok/*".into(), "bad[".into()],
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("allow"), "{err}");
    let err = admin
        .create_api_key(admin_req(pb::CreateApiKeyRequest {
            role: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
        ),
        "{err}"
    );
    assert!(err.message().contains("role"), "{err}");

    put_dev_role(&mut admin).await;
    let created = admin
        .create_api_key(admin_req(pb::CreateApiKeyRequest {
            role: "dev".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.starts_with("sntl_"));
    let id = created.key.unwrap().id;
    let got = admin
        .get_api_key(admin_req(pb::GetApiKeyRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{got:?}").contains(&created.secret));
    let rotated = admin
        .rotate_api_key(admin_req(pb::RotateApiKeyRequest {
            id: id.clone(),
            grace_seconds: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, created.secret);
    assert_eq!(rotated.key.unwrap().rotated_from, id);
    let err = admin
        .get_api_key(admin_req(pb::GetApiKeyRequest {
            id: "doesnotexist".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Backend secret headers never come back.
    admin
        .put_backend(admin_req(pb::PutBackendRequest {
            backend: Some(pb::Backend {
                name: "files".into(),
                timeout_ms: 5000,
                transport: Some(pb::backend::Transport::Http(pb::HttpBackend {
                    url: "http://127.0.0.1:9/mcp".into(),
                    headers: vec![pb::Header {
                        name: "authorization".into(),
                        value: "Bearer upstream-secret".into(),
                    }],
                })),
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
    let view = admin
        .get_policy(admin_req(pb::GetPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{view:?}").contains("upstream-secret"));
}

fn event(proxy: &str, seq: u64, prev: &[u8]) -> pb::AuditEvent {
    let mut ev = pb::AuditEvent {
        event_id: String::new(),
        request_id: format!("req-{seq}"),
        timestamp_us: sentinel_shared::now_us(),
        proxy_id: proxy.into(),
        epoch: 1,
        sequence: seq,
        subject: "alice".into(),
        role: "dev".into(),
        mcp_method: "tools/call".into(),
        tool: "echo".into(),
        backend: "everything".into(),
        arguments: "{}".into(),
        outcome: pb::Outcome::Ok as i32,
        http_status: 200,
        ..Default::default()
    };
    ev.event_id = sentinel_shared::audit::event_id_at(ev.timestamp_us);
    sentinel_shared::audit::seal(&mut ev, prev);
    ev
}

#[tokio::test]
async fn ingest_acks_after_commit_and_replays_add_nothing() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut events = Vec::new();
    let mut prev = Vec::new();
    for seq in 1..=100 {
        let ev = event("proxy-9", seq, &prev);
        prev = ev.hash.clone();
        events.push(ev);
    }
    let (tx, rx) = mpsc::channel(8);
    let mut client = AuditIngestClient::new(channel(cp.grpc).await);
    tx.send(pb::IngestRequest {
        msg: Some(ingest_request::Msg::Hello(pb::IngestHello {
            proxy_id: "proxy-9".into(),
            join_token: JOIN.into(),
        })),
    })
    .await
    .unwrap();
    let mut acks = client
        .ingest(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (i, chunk) in events.chunks(40).enumerate() {
        tx.send(pb::IngestRequest {
            msg: Some(ingest_request::Msg::Batch(pb::AuditBatch {
                batch_id: i as u64 + 1,
                events: chunk.to_vec(),
            })),
        })
        .await
        .unwrap();
    }
    let mut inserted = 0;
    for want in 1..=3u64 {
        let ack = acks.next().await.unwrap().unwrap();
        assert_eq!(ack.batch_id, want);
        // Acked means committed: the rows are visible to anyone now.
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        inserted += ack.inserted;
        assert!(n as u32 >= inserted);
    }
    assert_eq!(inserted, 100);
    // The whole stream replayed after a "lost ack": nothing new.
    tx.send(pb::IngestRequest {
        msg: Some(ingest_request::Msg::Batch(pb::AuditBatch {
            batch_id: 4,
            events: events.clone(),
        })),
    })
    .await
    .unwrap();
    let ack = acks.next().await.unwrap().unwrap();
    assert_eq!((ack.inserted, ack.duplicates), (0, 100));
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 100);

    // Query it back through the admin service, newest first.
    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let page = admin
        .query_audit(admin_req(pb::AuditQuery {
            proxy_id: "proxy-9".into(),
            limit: 10,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 10);
    assert_eq!(page.events[0].event.as_ref().unwrap().sequence, 100);
    assert!(!page.next_cursor.is_empty());
    let err = admin
        .query_audit(admin_req(pb::AuditQuery {
            outcome: "bogus".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("outcome"), "{err}");
}

#[tokio::test]
async fn ingest_refuses_a_stream_without_a_valid_hello() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut client = AuditIngestClient::new(channel(cp.grpc).await);
    let (tx, rx) = mpsc::channel(2);
    tx.send(pb::IngestRequest {
        msg: Some(ingest_request::Msg::Batch(pb::AuditBatch {
            batch_id: 1,
            events: vec![],
        })),
    })
    .await
    .unwrap();
    let err = client.ingest(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("hello"), "{err}");
    let _ = cp.http;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut client = ServerReflectionClient::new(channel(cp.grpc).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("no list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "sentinel.v1.PolicySync",
        "sentinel.v1.AuditIngest",
        "sentinel.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn bad_input_to_every_admin_call_is_a_clear_4xx_never_internal() {
    let db = TestDb::new().await;
    let cp = start_cp(&db, "cp-a").await;
    let mut admin = AdminClient::new(channel(cp.grpc).await);
    let nul = "a\0b".to_string();
    let long = "x".repeat(100_000);
    let mut codes = Vec::new();
    macro_rules! call {
        ($name:literal, $e:expr) => {{
            let code = match $e.await {
                Ok(_) => tonic::Code::Ok,
                Err(s) => {
                    assert!(!s.message().is_empty(), "{}: empty message", $name);
                    s.code()
                }
            };
            codes.push(($name, code));
        }};
    }
    for bad in [String::new(), nul.clone(), long.clone()] {
        call!(
            "create_api_key",
            admin.create_api_key(admin_req(pb::CreateApiKeyRequest {
                role: bad.clone(),
                owner: bad.clone(),
                description: bad.clone(),
                expires_at_us: -5
            }))
        );
        call!(
            "get_api_key",
            admin.get_api_key(admin_req(pb::GetApiKeyRequest { id: bad.clone() }))
        );
        call!(
            "revoke_api_key",
            admin.revoke_api_key(admin_req(pb::RevokeApiKeyRequest { id: bad.clone() }))
        );
        call!(
            "rotate_api_key",
            admin.rotate_api_key(admin_req(pb::RotateApiKeyRequest {
                id: bad.clone(),
                grace_seconds: u32::MAX
            }))
        );
        call!(
            "list_api_keys",
            admin.list_api_keys(admin_req(pb::ListApiKeysRequest {
                include_revoked: true,
                role: bad.clone(),
                owner: bad.clone()
            }))
        );
        call!(
            "put_role",
            admin.put_role(admin_req(pb::PutRoleRequest {
                role: Some(pb::Role {
                    name: bad.clone(),
                    allow_tools: vec![bad.clone()],
                    ..Default::default()
                })
            }))
        );
        call!(
            "put_role_none",
            admin.put_role(admin_req(pb::PutRoleRequest { role: None }))
        );
        call!(
            "delete_role",
            admin.delete_role(admin_req(pb::DeleteRequest { name: bad.clone() }))
        );
        call!(
            "put_backend",
            admin.put_backend(admin_req(pb::PutBackendRequest {
                backend: Some(pb::Backend {
                    name: bad.clone(),
                    transport: Some(pb::backend::Transport::Http(pb::HttpBackend {
                        url: bad.clone(),
                        headers: vec![pb::Header {
                            name: bad.clone(),
                            value: bad.clone()
                        }]
                    })),
                    ..Default::default()
                })
            }))
        );
        call!(
            "delete_backend",
            admin.delete_backend(admin_req(pb::DeleteRequest { name: bad.clone() }))
        );
        call!(
            "put_jwt_issuer",
            admin.put_jwt_issuer(admin_req(pb::PutJwtIssuerRequest {
                issuer: Some(pb::JwtIssuer {
                    name: bad.clone(),
                    issuer: bad.clone(),
                    ..Default::default()
                })
            }))
        );
        call!(
            "delete_jwt_issuer",
            admin.delete_jwt_issuer(admin_req(pb::DeleteRequest { name: bad.clone() }))
        );
        call!(
            "apply_policy",
            admin.apply_policy(admin_req(pb::ApplyPolicyRequest {
                spec: Some(pb::PolicySpec {
                    roles: vec![pb::Role {
                        name: bad.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                dry_run: false
            }))
        );
        call!(
            "apply_policy_none",
            admin.apply_policy(admin_req(pb::ApplyPolicyRequest {
                spec: None,
                dry_run: true
            }))
        );
        call!(
            "query_audit",
            admin.query_audit(admin_req(pb::AuditQuery {
                subject: bad.clone(),
                outcome: bad.clone(),
                cursor: bad.clone(),
                tool: bad.clone(),
                limit: u32::MAX,
                from_us: i64::MAX,
                to_us: i64::MIN,
                ..Default::default()
            }))
        );
        call!(
            "create_join_token",
            admin.create_join_token(admin_req(pb::CreateJoinTokenRequest {
                description: bad.clone()
            }))
        );
    }
    let bad: Vec<_> = codes
        .iter()
        .filter(|(_, c)| {
            matches!(
                c,
                tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Unavailable
            )
        })
        .collect();
    assert!(bad.is_empty(), "server-side failures on bad input: {bad:?}");
}
