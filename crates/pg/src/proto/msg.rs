//! Message types by name: what the relay matches on rather than raw type bytes. The same byte
//! means different messages in the two directions (`D` is Describe from a client, DataRow from
//! a server), so each direction has its own type.

/// A message a client (frontend) sends, by its type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg {
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    FunctionCall,
    Sync,
    Close,
    Flush,
    CopyData,
    CopyDone,
    CopyFail,
    Terminate,
    /// Anything else (refused by the relay).
    Other(u8),
}

impl ClientMsg {
    #[inline]
    pub fn of(tag: u8) -> ClientMsg {
        match tag {
            b'Q' => ClientMsg::Query,
            b'P' => ClientMsg::Parse,
            b'B' => ClientMsg::Bind,
            b'D' => ClientMsg::Describe,
            b'E' => ClientMsg::Execute,
            b'F' => ClientMsg::FunctionCall,
            b'S' => ClientMsg::Sync,
            b'C' => ClientMsg::Close,
            b'H' => ClientMsg::Flush,
            b'd' => ClientMsg::CopyData,
            b'c' => ClientMsg::CopyDone,
            b'f' => ClientMsg::CopyFail,
            b'X' => ClientMsg::Terminate,
            other => ClientMsg::Other(other),
        }
    }

    pub fn tag(self) -> u8 {
        match self {
            ClientMsg::Query => b'Q',
            ClientMsg::Parse => b'P',
            ClientMsg::Bind => b'B',
            ClientMsg::Describe => b'D',
            ClientMsg::Execute => b'E',
            ClientMsg::FunctionCall => b'F',
            ClientMsg::Sync => b'S',
            ClientMsg::Close => b'C',
            ClientMsg::Flush => b'H',
            ClientMsg::CopyData => b'd',
            ClientMsg::CopyDone => b'c',
            ClientMsg::CopyFail => b'f',
            ClientMsg::Terminate => b'X',
            ClientMsg::Other(tag) => tag,
        }
    }
}

/// A message a server (backend) sends, by its type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMsg {
    ParseComplete,
    BindComplete,
    CloseComplete,
    RowDescription,
    NoData,
    DataRow,
    CommandComplete,
    EmptyQueryResponse,
    PortalSuspended,
    ErrorResponse,
    NoticeResponse,
    NotificationResponse,
    FunctionCallResponse,
    ReadyForQuery,
    ParameterStatus,
    CopyOutResponse,
    CopyData,
    CopyDone,
    /// Anything else (forwarded as it is).
    Other(u8),
}

impl ServerMsg {
    #[inline]
    pub fn of(tag: u8) -> ServerMsg {
        match tag {
            b'1' => ServerMsg::ParseComplete,
            b'2' => ServerMsg::BindComplete,
            b'3' => ServerMsg::CloseComplete,
            b'T' => ServerMsg::RowDescription,
            b'n' => ServerMsg::NoData,
            b'D' => ServerMsg::DataRow,
            b'C' => ServerMsg::CommandComplete,
            b'I' => ServerMsg::EmptyQueryResponse,
            b's' => ServerMsg::PortalSuspended,
            b'E' => ServerMsg::ErrorResponse,
            b'N' => ServerMsg::NoticeResponse,
            b'A' => ServerMsg::NotificationResponse,
            b'V' => ServerMsg::FunctionCallResponse,
            b'Z' => ServerMsg::ReadyForQuery,
            b'S' => ServerMsg::ParameterStatus,
            b'H' => ServerMsg::CopyOutResponse,
            b'd' => ServerMsg::CopyData,
            b'c' => ServerMsg::CopyDone,
            other => ServerMsg::Other(other),
        }
    }

    pub fn tag(self) -> u8 {
        match self {
            ServerMsg::ParseComplete => b'1',
            ServerMsg::BindComplete => b'2',
            ServerMsg::CloseComplete => b'3',
            ServerMsg::RowDescription => b'T',
            ServerMsg::NoData => b'n',
            ServerMsg::DataRow => b'D',
            ServerMsg::CommandComplete => b'C',
            ServerMsg::EmptyQueryResponse => b'I',
            ServerMsg::PortalSuspended => b's',
            ServerMsg::ErrorResponse => b'E',
            ServerMsg::NoticeResponse => b'N',
            ServerMsg::NotificationResponse => b'A',
            ServerMsg::FunctionCallResponse => b'V',
            ServerMsg::ReadyForQuery => b'Z',
            ServerMsg::ParameterStatus => b'S',
            ServerMsg::CopyOutResponse => b'H',
            ServerMsg::CopyData => b'd',
            ServerMsg::CopyDone => b'c',
            ServerMsg::Other(tag) => tag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_byte_names_one_message_and_back() {
        for tag in 0..=u8::MAX {
            assert_eq!(ClientMsg::of(tag).tag(), tag);
            assert_eq!(ServerMsg::of(tag).tag(), tag);
        }
        assert_eq!(ClientMsg::of(b'D'), ClientMsg::Describe);
        assert_eq!(ServerMsg::of(b'D'), ServerMsg::DataRow);
        assert_eq!(ClientMsg::of(b'Y'), ClientMsg::Other(b'Y'));
    }
}
