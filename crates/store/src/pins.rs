//! MCP tool pins (rug-pull detection): each tool's definition fingerprint as first listed, and
//! the one listed since when it differs. Kept in the store so a restart or another replica does
//! not forget a pin (which would let a changed definition be pinned afresh).

/// One tool's pin on one resource.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct McpPinRecord {
    pub resource: String,
    pub tool: String,
    /// SHA-256 (hex) of the definition approved for use.
    pub pinned_sha256: String,
    pub pinned_at_unix_ms: i64,
    /// Who approved the pinned definition (`None`: pinned at its first listing).
    pub pinned_by: Option<String>,
    /// The definition last listed when it differs from the pinned one.
    pub seen_sha256: Option<String>,
    pub seen_at_unix_ms: Option<i64>,
}

impl McpPinRecord {
    /// The listed definition differs from the pinned one.
    pub fn changed(&self) -> Option<&str> {
        self.seen_sha256
            .as_deref()
            .filter(|s| *s != self.pinned_sha256)
    }
}

/// What [`crate::Store::mcp_pin_see`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSeen {
    /// No pin yet: this definition is pinned now.
    New(McpPinRecord),
    /// The pinned definition.
    Same(McpPinRecord),
    /// Another definition than the pinned one (recorded as `seen_sha256`).
    Changed(McpPinRecord),
}

impl PinSeen {
    pub fn record(&self) -> &McpPinRecord {
        match self {
            PinSeen::New(r) | PinSeen::Same(r) | PinSeen::Changed(r) => r,
        }
    }
}
