"""A real SAML 2.0 identity provider (pysaml2) for tests/saml.rs.

  idp.py metadata --dir D --port P              keys (made now, in D) and D/idp-metadata.xml
  idp.py serve --dir D --port P --sp-metadata F  serve on 127.0.0.1:P

Sign-in: GET /sso/redirect (HTTP-Redirect binding) shows a login form; POST /login with the
user's password answers with pysaml2's HTTP-POST binding form for the SP's ACS. The test may add
`attack` to that POST to get an answer a hostile party could produce:

  unsigned    nothing signed
  other_key   signed, but with a key that is not in the metadata
  audience    an assertion for another SP (Audience)
  recipient   Destination and Recipient of another ACS
  expired     Conditions and SubjectConfirmation ended ten minutes ago
  irt         InResponseTo of a request the SP never sent
  xsw         the signed answer plus an injected unsigned assertion for "root"
"""

import argparse
import base64
import html
import os
import re
import subprocess
import sys
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

warnings.filterwarnings("ignore")

from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT  # noqa: E402
from saml2 import xmldsig as ds  # noqa: E402
from saml2.config import IdPConfig  # noqa: E402
from saml2.metadata import create_metadata_string  # noqa: E402
from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, NameID  # noqa: E402
from saml2.server import Server  # noqa: E402
from saml2.authn_context import AuthnBroker, PASSWORD, authn_context_class_ref  # noqa: E402

USERS = {
    "alice": ("alice-pw", {"groups": ["idp-sre", "staff"], "mail": ["alice@example.com"]}),
    "bob": ("bob-pw", {"groups": ["staff"], "mail": ["bob@example.com"]}),
}


def make_key(d, name):
    key, cert = os.path.join(d, name + ".key"), os.path.join(d, name + ".crt")
    if not os.path.exists(cert):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=tollgate test idp " + name, "-keyout", key, "-out", cert],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return key, cert


def config(d, port, key, sp_metadata=None, lifetime_minutes=15):
    base = "http://127.0.0.1:%d" % port
    c = {
        "entityid": base + "/idp/metadata",
        "service": {
            "idp": {
                "name": "tollgate test IdP",
                "endpoints": {
                    "single_sign_on_service": [(base + "/sso/redirect", BINDING_HTTP_REDIRECT)],
                },
                "policy": {"default": {"lifetime": {"minutes": lifetime_minutes},
                                       "attribute_restrictions": None,
                                       "fail_on_missing_requested": False}},
                "name_id_format": [NAMEID_FORMAT_UNSPECIFIED],
                "want_authn_requests_signed": False,
            },
        },
        "key_file": key[0],
        "cert_file": key[1],
        "xmlsec_binary": "/usr/bin/xmlsec1",
        "signing_algorithm": ds.SIG_RSA_SHA256,
        "digest_algorithm": ds.DIGEST_SHA256,
        "metadata": {"local": [sp_metadata]} if sp_metadata else {},
    }
    conf = IdPConfig()
    conf.load(c)
    return conf


def cmd_metadata(args):
    key = make_key(args.dir, "idp")
    make_key(args.dir, "evil")
    conf = config(args.dir, args.port, key)
    with open(os.path.join(args.dir, "idp-metadata.xml"), "w") as f:
        md = create_metadata_string(None, config=conf, valid=48, sign=False)
        f.write(md.decode() if isinstance(md, bytes) else md)


def login_page(saml_request, relay_state, error=""):
    return """<!doctype html><html><body><h1>Test IdP</h1><p>%s</p>
<form method="post" action="/login">
<input type="hidden" name="SAMLRequest" value="%s"/>
<input type="hidden" name="RelayState" value="%s"/>
<input name="username"/><input name="password" type="password"/>
<button type="submit">Sign in</button></form></body></html>""" % (
        html.escape(error), html.escape(saml_request), html.escape(relay_state))


def inject_unsigned_assertion(xml):
    """XSW: a copy of the signed assertion, its signature removed, naming another subject, put
    in front of the genuine one (whose signature still verifies)."""
    m = re.search(r"<(\w+:)?Assertion\b.*?</(\w+:)?Assertion>", xml, re.S)
    genuine = m.group(0)
    evil = re.sub(r"<(\w+:)?Signature\b.*?</(\w+:)?Signature>", "", genuine, flags=re.S)
    evil = re.sub(r'ID="[^"]+"', 'ID="_evil0000000000000000000000000001"', evil, count=1)
    evil = re.sub(r"(<(\w+:)?NameID\b[^>]*>)[^<]*", r"\1root", evil, count=1)
    return xml[:m.start()] + evil + xml[m.start():]


def serve(args):
    key = make_key(args.dir, "idp")
    evil_key = make_key(args.dir, "evil")
    idp = Server(config=config(args.dir, args.port, key, args.sp_metadata))
    evil = Server(config=config(args.dir, args.port, evil_key, args.sp_metadata))
    expired = Server(config=config(args.dir, args.port, key, args.sp_metadata, lifetime_minutes=-10))
    broker = AuthnBroker()
    broker.add(authn_context_class_ref(PASSWORD), "")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            sys.stderr.write("idp: " + (fmt % a) + "\n")

        def reply(self, status, body, ctype="text/html; charset=utf-8"):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/idp/metadata":
                with open(os.path.join(args.dir, "idp-metadata.xml")) as f:
                    return self.reply(200, f.read(), "application/samlmetadata+xml")
            if url.path != "/sso/redirect" or "SAMLRequest" not in q:
                return self.reply(404, "not found")
            try:
                idp.parse_authn_request(q["SAMLRequest"], BINDING_HTTP_REDIRECT)
            except Exception as e:  # a request the IdP does not take
                return self.reply(400, "bad AuthnRequest: %s" % e, "text/plain")
            self.reply(200, login_page(q["SAMLRequest"], q.get("RelayState", "")))

        def do_POST(self):
            if self.path != "/login":
                return self.reply(404, "not found")
            n = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
            user = form.get("username", "")
            if USERS.get(user, (None,))[0] != form.get("password"):
                return self.reply(200, login_page(form["SAMLRequest"], form.get("RelayState", ""),
                                                  "wrong user name or password"))
            attack = form.get("attack", "")
            server = {"other_key": evil, "expired": expired}.get(attack, idp)
            req = idp.parse_authn_request(form["SAMLRequest"], BINDING_HTTP_REDIRECT)
            resp_args = idp.response_args(req.message, [BINDING_HTTP_POST])
            if attack == "audience":
                resp_args["sp_entity_id"] = "https://other-service.example/saml"
            if attack == "recipient":
                resp_args["destination"] = "https://other-service.example/saml/acs"
            if attack == "irt":
                resp_args["in_response_to"] = "_0123456789abcdef0123456789abcdef"
            signed = attack != "unsigned"
            resp = server.create_authn_response(
                USERS[user][1], userid=user,
                name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED, text=user),
                authn=broker.get_authn_by_accr(PASSWORD),
                sign_response=False, sign_assertion=signed,
                sign_alg=ds.SIG_RSA_SHA256, digest_alg=ds.DIGEST_SHA256,
                **resp_args)
            xml = str(resp)
            if attack == "xsw":
                xml = inject_unsigned_assertion(xml)
            acs = resp_args["destination"]
            if attack == "recipient":
                acs = idp.response_args(req.message, [BINDING_HTTP_POST])["destination"]
            body = base64.b64encode(xml.encode()).decode()
            page = """<!doctype html><html><body onload="document.forms[0].submit()">
<form method="post" action="%s">
<input type="hidden" name="SAMLResponse" value="%s"/>
<input type="hidden" name="RelayState" value="%s"/>
<noscript><button type="submit">Continue</button></noscript></form></body></html>""" % (
                html.escape(acs), body, html.escape(form.get("RelayState", "")))
            self.reply(200, page)

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    sys.stderr.write("idp: listening on 127.0.0.1:%d\n" % args.port)
    sys.stderr.flush()
    httpd.serve_forever()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["metadata", "serve"])
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sp-metadata")
    args = p.parse_args()
    if args.command == "metadata":
        cmd_metadata(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()
