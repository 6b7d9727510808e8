//! The PostgreSQL v3 wire protocol as pure functions over byte buffers: no sockets here.
//!
//! `frame` splits a buffer into typed messages (checking every length against a limit before
//! anything is allocated); `startup` parses the untyped packets that open a connection;
//! `backend` and `frontend` build and parse the individual messages the gateway looks inside;
//! `msg` names the message types.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod msg;
pub mod startup;

pub use frame::{next_frame, Frame, FrameError};
pub use msg::{ClientMsg, ServerMsg};
