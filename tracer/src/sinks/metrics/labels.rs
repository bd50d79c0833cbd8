//! The label sets of the metric families: which labels each family carries,
//! in the order the exposition shows them.

use prometheus_client::encoding::EncodeLabelSet;

use super::budget::Label;
use crate::event::ClosedBy;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ConnLabels {
    pub(super) comm: Label,
    pub(super) container_id: Label,
    pub(super) pod_uid: Label,
    pub(super) role: &'static str,
    pub(super) remote: Label,
    pub(super) port: Label,
}

impl ConnLabels {
    /// The labels of a client connection's process and destination.
    pub(super) fn remote_labels(&self) -> RemoteLabels {
        RemoteLabels {
            comm: self.comm.clone(),
            container_id: self.container_id.clone(),
            pod_uid: self.pod_uid.clone(),
            remote: self.remote.clone(),
        }
    }

    /// The labels of a server connection's process and listening port.
    pub(super) fn port_labels(&self) -> PortLabels {
        PortLabels {
            comm: self.comm.clone(),
            container_id: self.container_id.clone(),
            pod_uid: self.pod_uid.clone(),
            port: self.port.clone(),
        }
    }

    pub(super) fn closed(&self, closed_by: ClosedBy) -> CloseLabels {
        CloseLabels {
            conn: self.clone(),
            closed_by: closed_by.name(),
        }
    }

    pub(super) fn reset(&self, direction: &'static str) -> ResetLabels {
        ResetLabels {
            conn: self.clone(),
            direction,
        }
    }
}

/// A connection's labels and who closed it: `closed_by` comes last in the
/// exposition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CloseLabels {
    #[prometheus(flatten)]
    pub(super) conn: ConnLabels,
    pub(super) closed_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResetLabels {
    #[prometheus(flatten)]
    pub(super) conn: ConnLabels,
    pub(super) direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RemoteLabels {
    pub(super) comm: Label,
    pub(super) container_id: Label,
    pub(super) pod_uid: Label,
    pub(super) remote: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrnoLabels {
    pub(super) comm: Label,
    pub(super) container_id: Label,
    pub(super) pod_uid: Label,
    pub(super) remote: Label,
    pub(super) errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PortLabels {
    pub(super) comm: Label,
    pub(super) container_id: Label,
    pub(super) pod_uid: Label,
    pub(super) port: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FindingLabels {
    pub(super) comm: Label,
    pub(super) container_id: Label,
    pub(super) pod_uid: Label,
    pub(super) kind: &'static str,
    pub(super) finding_severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AttachLabels {
    pub(super) state_hook: String,
    pub(super) reuse_hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BuildLabels {
    pub(super) version: String,
}
