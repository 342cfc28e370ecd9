//! The one place where failures become client responses. Bodies are short and generic; the
//! details (addresses, causes) go to the log.

use std::time::Duration;

use http::header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no backend is up")]
    NoBackend,
    #[error("upstream request failed")]
    Upstream(#[source] crate::upstream::UpstreamError),
    #[error("upstream switched protocols though the client asked for no upgrade")]
    UnaskedSwitch,
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request refused: {0}")]
    Refused(#[from] crate::validate::Rejection),
    #[error("request body larger than limits.max_body_bytes")]
    BodyTooLarge,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) | Self::UnaskedSwitch => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Refused(crate::validate::Rejection::Connect) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Refused(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn into_response(self, retry_after: &HeaderValue) -> Response<ProxyBody> {
        let status = self.status();
        // The rest of the request cannot be trusted or was not read: end the connection.
        let refused = matches!(self, Self::Refused(_) | Self::BodyTooLarge);
        let text = match self {
            Self::NoBackend => "503 Service Unavailable: no backend is available\n",
            Self::Upstream(_) | Self::UnaskedSwitch => {
                "502 Bad Gateway: the upstream server failed\n"
            }
            Self::Timeout(_) => "504 Gateway Timeout: the upstream server did not answer in time\n",
            Self::Refused(crate::validate::Rejection::Connect) => "405 Method Not Allowed\n",
            Self::Refused(_) => "400 Bad Request\n",
            Self::BodyTooLarge => "413 Content Too Large\n",
        };
        let mut resp = Response::new(ProxyBody::local(text));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if refused {
            // The framing of what follows on this connection cannot be trusted: end it.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, retry_after.clone());
        }
        resp
    }
}

/// Renders an error with its sources, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
