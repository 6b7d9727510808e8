//! `tollgate mcp pin`: the tools an MCP resource's server lists now, asked by an MCP client of
//! the gateway's own through the configured upstream (fresh TLS verified as configured, the
//! injected credential), each with the fingerprint a listing through the gateway pins.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request};
use serde_json::{json, Value};
use tollgate_config::{Config, ResourceKind};

use super::{messages_of, tool_fingerprint, PROTOCOL_VERSIONS};
use crate::{names, Target};

/// One tool as listed: its name, its fingerprint and its definition.
pub struct ListedTool {
    pub name: String,
    pub sha256: String,
    pub definition: Value,
}

/// Most `tools/list` pages read.
const MAX_PAGES: usize = 100;

/// The tools resource `name`'s server lists now, every page of them.
pub async fn upstream_tools(config: &Config, name: &str) -> anyhow::Result<Vec<ListedTool>> {
    let resource = config
        .resources
        .iter()
        .find(|r| r.name == name && r.kind == ResourceKind::Mcp)
        .ok_or_else(|| anyhow!("no MCP resource {name:?} in the config"))?;
    if resource.stdio.is_some() {
        bail!("resource {name:?} is a stdio server: its tools are pinned at their first listing through the gateway");
    }
    let served = std::sync::Arc::new(names::ServedNames::load(&config.server.tls_cert)?);
    let target = Target::new(resource, None, None, &served)?;
    let mut client = Session { target, id: None };
    let latest = PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1];
    let init = client
        .call(
            "initialize",
            json!({"protocolVersion": latest, "capabilities": {},
            "clientInfo": {"name": "tollgate mcp pin", "version": env!("CARGO_PKG_VERSION")}}),
        )
        .await?;
    let version = init["protocolVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !PROTOCOL_VERSIONS.contains(&version.as_str()) {
        bail!(
            "the server chose MCP protocol version {version:?}, which the gateway does not relay"
        );
    }
    client.notify("notifications/initialized").await?;
    let mut tools = Vec::new();
    let mut cursor: Option<Value> = None;
    for _ in 0..MAX_PAGES {
        let params = cursor.map(|c| json!({"cursor": c})).unwrap_or(json!({}));
        let page = client.call("tools/list", params).await?;
        for t in page["tools"].as_array().into_iter().flatten() {
            tools.push(ListedTool {
                name: t["name"].as_str().unwrap_or_default().to_string(),
                sha256: tool_fingerprint(t),
                definition: t.clone(),
            });
        }
        cursor = page.get("nextCursor").filter(|c| !c.is_null()).cloned();
        if cursor.is_none() {
            break;
        }
    }
    client.end().await;
    Ok(tools)
}

/// A streamable-HTTP MCP session with the upstream.
struct Session {
    target: Target,
    id: Option<String>,
}

impl Session {
    async fn send(&mut self, method: Method, body: Option<Value>) -> anyhow::Result<(u16, Bytes)> {
        let http = self
            .target
            .resource
            .http
            .as_ref()
            .expect("an http upstream");
        let uri = format!("{}{}", self.target.origin, http.base_path);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, &self.target.host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(id) = &self.id {
            req = req.header("mcp-session-id", id);
        }
        if let Some((name, value)) = &self.target.inject {
            req = req.header(name, value);
        }
        let req = req.body(
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed(),
        )?;
        let resp = tokio::time::timeout(http.response_timeout, self.target.client.request(req))
            .await
            .map_err(|_| anyhow!("the MCP server did not answer in time"))?
            .context("the MCP server could not be reached")?;
        if let Some(id) = resp.headers().get("mcp-session-id") {
            self.id = Some(id.to_str()?.to_string());
        }
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let msg = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let (status, body) = self.send(Method::POST, Some(msg)).await?;
        let answer = messages_of(&body)
            .into_iter()
            .find(|m| m.get("id") == Some(&json!(1)))
            .ok_or_else(|| {
                anyhow!("{method}: the MCP server answered HTTP {status} without an answer")
            })?;
        match answer.get("result") {
            Some(r) => Ok(r.clone()),
            None => bail!("{method}: the MCP server answered {}", answer["error"]),
        }
    }

    async fn notify(&mut self, method: &str) -> anyhow::Result<()> {
        let msg = json!({"jsonrpc": "2.0", "method": method});
        self.send(Method::POST, Some(msg)).await.map(|_| ())
    }

    /// Ends the session (a server that keeps none answers 405, which is as good).
    async fn end(&mut self) {
        if self.id.is_some() {
            let _ = self.send(Method::DELETE, None).await;
        }
    }
}
