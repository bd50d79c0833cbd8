//! What the agent reads from the host beside the kernel programs: the owners
//! of sockets the programs met without one ([`owners`], from /proc), the
//! container a process runs in ([`containers`]), and the listeners' accept
//! queues ([`listen_queue`], through [`sock_diag`]).

pub mod containers;
pub mod listen_queue;
pub mod listeners;
pub mod owners;
pub mod sock_diag;
pub mod surroundings;
