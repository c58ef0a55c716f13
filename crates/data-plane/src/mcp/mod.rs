//! MCP toward agents: JSON-RPC framing ([`jsonrpc`]), sealed sessions
//! ([`session`]), federation of several upstreams into one server
//! ([`federation`]), edge checks ([`edge`]) and the Streamable HTTP endpoint
//! for both protocol eras ([`front`]), the pass-through of plain answers
//! ([`raw`]), and the same server on stdin/stdout ([`stdio_front`]).

pub mod edge;
pub mod federation;
pub mod front;
pub mod jsonrpc;
pub mod raw;
pub mod session;
pub mod stdio_front;
