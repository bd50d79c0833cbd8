//! Resolves the kernel struct field offsets the programs read, from the running
//! kernel's BTF. Rust eBPF cannot emit CO-RE relocations; this table, handed to the
//! programs as a load-time global, is what keeps them correct on every kernel.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Type};
use tracer_common::config::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "no kernel BTF at {path}: this kernel was built without CONFIG_DEBUG_INFO_BTF; \
         pass a BTF file for it with --btf (e.g. from btfhub)"
    )]
    Missing { path: PathBuf },
    #[error("cannot parse BTF from {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no field {field} in this kernel's BTF")]
    NoField { strukt: String, field: String },
    #[error("{strukt}.{field} is a bit-field; the programs cannot read it")]
    Bitfield { strukt: String, field: String },
    #[error("{strukt}.{field} is {actual} bytes in this kernel, the programs read {expected}")]
    Size {
        strukt: String,
        field: String,
        expected: usize,
        actual: usize,
    },
    #[error("kernel BTF has no {variant} in enum {name}")]
    NoEnumValue { name: String, variant: String },
    #[error("BTF lookup failed")]
    Lookup(#[source] btf_rs::Error),
}

/// Kernel BTF, parsed.
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
}

/// A field's place inside its struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

impl KernelBtf {
    /// Parses `path`, or the running kernel's BTF when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, BtfError> {
        let path = path.unwrap_or(Path::new(VMLINUX_BTF)).to_path_buf();
        if !path.exists() {
            return Err(BtfError::Missing { path });
        }
        let btf = Btf::from_file(&path).map_err(|source| BtfError::Parse {
            path: path.clone(),
            source,
        })?;
        Ok(Self { btf, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel has a BTF tracepoint named `name` (`tp_btf/<name>`).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .is_ok_and(|types| !types.is_empty())
    }

    fn find_struct(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(name.to_string()))?;
        types
            .into_iter()
            .find_map(|ty| match ty {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// Offset and size of `path` (dot-separated, through nested structs) in struct
    /// `strukt`. Members of anonymous structs and unions are found as the C
    /// compiler finds them: as if they were members of the enclosing struct.
    pub fn field(&self, strukt: &str, path: &str) -> Result<Field, BtfError> {
        let no_field = || BtfError::NoField {
            strukt: strukt.to_string(),
            field: path.to_string(),
        };
        let mut current = self.find_struct(strukt)?;
        let mut offset = 0;
        let mut size = 0;
        let mut parts = path.split('.').peekable();
        while let Some(name) = parts.next() {
            let (bits, member) = self.find_member(&current, name)?.ok_or_else(no_field)?;
            if member.bitfield_size().is_some_and(|size| size != 0) || bits % 8 != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_string(),
                    field: path.to_string(),
                });
            }
            offset += bits as usize / 8;
            let ty = self.resolve(&member)?;
            size = self.size_of(&ty)?;
            if parts.peek().is_some() {
                current = match ty {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => return Err(no_field()),
                };
            }
        }
        Ok(Field { offset, size })
    }

    /// Finds `name` among `strukt`'s members, descending into anonymous members.
    /// Returns the member and its bit offset from the start of `strukt`.
    fn find_member(
        &self,
        strukt: &btf_rs::Struct,
        name: &str,
    ) -> Result<Option<(u32, btf_rs::Member)>, BtfError> {
        for member in &strukt.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            if member_name == name {
                return Ok(Some((member.bit_offset(), member.clone())));
            }
            if member_name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.resolve(member)?
                && let Some((bits, found)) = self.find_member(&inner, name)?
            {
                return Ok(Some((member.bit_offset() + bits, found)));
            }
        }
        Ok(None)
    }

    /// The type a member has, through typedefs and qualifiers.
    fn resolve(&self, member: &dyn BtfType) -> Result<Type, BtfError> {
        let mut ty = self
            .btf
            .resolve_chained_type(member)
            .map_err(BtfError::Lookup)?;
        loop {
            ty = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t),
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(t)
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(t),
                _ => return Ok(ty),
            }
            .map_err(BtfError::Lookup)?;
        }
    }

    fn size_of(&self, ty: &Type) -> Result<usize, BtfError> {
        Ok(match ty {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Float(f) => f.size(),
            Type::Array(a) => a.len() * self.size_of(&self.resolve(a)?)?,
            _ => 0,
        })
    }

    /// The value of `variant` in `enum name`.
    pub fn enum_value(&self, name: &str, variant: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoEnumValue {
            name: name.to_string(),
            variant: variant.to_string(),
        };
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| missing())?;
        for ty in types {
            if let Type::Enum(e) = ty {
                for member in &e.members {
                    if self.btf.resolve_name(member).is_ok_and(|n| n == variant) {
                        return Ok(member.val());
                    }
                }
            }
        }
        Err(missing())
    }

    /// Offset of a field the programs read, checked against the size they read.
    fn offset(&self, strukt: &str, path: &str, expected: usize) -> Result<u32, BtfError> {
        let field = self.field(strukt, path)?;
        if field.size != expected {
            return Err(BtfError::Size {
                strukt: strukt.to_string(),
                field: path.to_string(),
                expected,
                actual: field.size,
            });
        }
        Ok(field.offset as u32)
    }

    /// Every offset the kernel programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let sock = |path: &str, size| self.offset("sock", path, size);
        let tcp = |path: &str, size| self.offset("tcp_sock", path, size);
        Ok(KernelOffsets {
            skc_family: sock("__sk_common.skc_family", 2)?,
            skc_state: sock("__sk_common.skc_state", 1)?,
            skc_daddr: sock("__sk_common.skc_daddr", 4)?,
            skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr", 4)?,
            skc_dport: sock("__sk_common.skc_dport", 2)?,
            skc_num: sock("__sk_common.skc_num", 2)?,
            skc_v6_daddr: sock("__sk_common.skc_v6_daddr", 16)?,
            skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr", 16)?,
            skc_net: sock("__sk_common.skc_net.net", 8)?,
            sk_protocol: sock("sk_protocol", 2)?,
            sk_type: sock("sk_type", 2)?,
            sk_err: sock("sk_err", 4)?,
            sk_socket: sock("sk_socket", 8)?,
            sk_flags: sock("__sk_common.skc_flags", 8)?,
            sock_done_bit: self.enum_value("sock_flags", "SOCK_DONE")?,
            inet_sport: self.offset("inet_sock", "inet_sport", 2)?,
            tcp_lsndtime: tcp("lsndtime", 4)?,
            tcp_bytes_sent: tcp("bytes_sent", 8)?,
            tcp_bytes_retrans: tcp("bytes_retrans", 8)?,
            tcp_bytes_received: tcp("bytes_received", 8)?,
            tcp_srtt_us: tcp("srtt_us", 4)?,
            tcp_total_retrans: tcp("total_retrans", 4)?,
            tcp_write_seq: tcp("write_seq", 4)?,
            icsk_ack_lrcvtime: tcp("inet_conn.icsk_ack.lrcvtime", 4)?,
            net_ns_inum: self.offset("net", "ns.inum", 4)?,
            task_files: self.offset("task_struct", "files", 8)?,
            task_group_leader: self.offset("task_struct", "group_leader", 8)?,
            task_comm: self.offset("task_struct", "comm", 16)?,
            files_fdt: self.offset("files_struct", "fdt", 8)?,
            fdtable_max_fds: self.offset("fdtable", "max_fds", 4)?,
            fdtable_fd: self.offset("fdtable", "fd", 8)?,
            file_private_data: self.offset("file", "private_data", 8)?,
            socket_sk: self.offset("socket", "sk", 8)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine_btf() -> KernelBtf {
        KernelBtf::load(None).expect("this machine's kernel BTF (/sys/kernel/btf/vmlinux)")
    }

    /// Every offset resolves on the running kernel, and the ones whose place is fixed
    /// by the kernel's own layout rules come out where they must.
    #[test]
    fn resolves_all_offsets_on_this_kernel() {
        let offsets = machine_btf().kernel_offsets().expect("all offsets resolve");
        // struct sock_common starts with the address pair: skc_daddr, skc_rcv_saddr.
        assert_eq!(offsets.skc_daddr, 0);
        assert_eq!(offsets.skc_rcv_saddr, 4);
        // skc_dport and skc_num share a 32-bit word right after the hash.
        assert_eq!(offsets.skc_num, offsets.skc_dport + 2);
        assert!(offsets.skc_v6_rcv_saddr > offsets.skc_v6_daddr);
        // tcp_sock embeds inet_connection_sock, which embeds inet_sock, which embeds
        // sock: tcp-only fields come after all of struct sock.
        let btf = machine_btf();
        let sock_size = btf.field("tcp_sock", "inet_conn.icsk_inet.sk").unwrap();
        assert_eq!(sock_size.offset, 0);
        assert!(offsets.tcp_lsndtime as usize >= sock_size.size);
        assert!(offsets.tcp_bytes_sent as usize >= sock_size.size);
        assert!(offsets.icsk_ack_lrcvtime as usize >= sock_size.size);
    }

    #[test]
    fn finds_members_of_anonymous_unions() {
        // skc_daddr sits in an anonymous struct inside an anonymous union.
        let field = machine_btf().field("sock_common", "skc_daddr").unwrap();
        assert_eq!(field, Field { offset: 0, size: 4 });
    }

    #[test]
    fn unknown_field_and_struct_are_named_in_the_error() {
        let btf = machine_btf();
        let err = btf.field("sock", "no_such_field").unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock has no field no_such_field in this kernel's BTF"
        );
        let err = btf.field("no_such_struct", "x").unwrap_err();
        assert_eq!(err.to_string(), "kernel BTF has no struct no_such_struct");
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let err = machine_btf().offset("sock", "sk_err", 8).unwrap_err();
        assert!(matches!(err, BtfError::Size { actual: 4, .. }), "{err}");
    }

    #[test]
    fn bitfields_are_refused() {
        // tcp_sock.repair is a one-bit field.
        let err = machine_btf().field("tcp_sock", "repair").unwrap_err();
        assert!(matches!(err, BtfError::Bitfield { .. }), "{err}");
    }

    #[test]
    fn missing_btf_file_says_what_to_do() {
        let err = KernelBtf::load(Some(Path::new("/nonexistent/vmlinux")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("--btf"), "{err}");
    }

    #[test]
    fn enum_values() {
        let btf = machine_btf();
        // SOCK_DEAD and SOCK_DONE open enum sock_flags in every kernel so far.
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DEAD").unwrap(), 0);
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DONE").unwrap(), 1);
        assert!(btf.enum_value("sock_flags", "NO_SUCH_FLAG").is_err());
    }

    #[test]
    fn knows_btf_tracepoints() {
        let btf = machine_btf();
        assert!(btf.has_btf_tracepoint("inet_sock_set_state"));
        assert!(!btf.has_btf_tracepoint("no_such_tracepoint"));
    }
}
