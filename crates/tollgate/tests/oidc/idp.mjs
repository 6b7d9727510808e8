// A real OpenID provider (npm oidc-provider 8) for the OIDC tests, over TLS.
// Usage: node idp.mjs <port> <cert.pem> <key.pem> <keys-dir> <issuer> [redirect-uri,...]
// The signing key lives in <keys-dir> (made on first use: signing.jwk private JWK, signing.pem
// PKCS#8, public.pem SPKI), so a test can craft tokens with the IdP's own key, and rotate it by
// restarting with another directory. Clients use the client_credentials grant; access tokens
// are JWTs (resource indicators) with a `groups` claim chosen per client.
// People sign in through the provider's own login and consent pages (devInteractions: any
// password) as the public client `tollgate-login` (authorization code + PKCE, loopback redirect
// on any port as RFC 8252 §7.3 asks, and the device flow), or as the confidential client
// `tollgate-console` (its secret in HTTP Basic); their ID tokens carry `groups` from
// PEOPLE. `tollgate-short` is the same client with device codes that expire after 3 s.
// Device flow: the authorization answer names interval 1, the first poll of each device code
// is answered `slow_down`, and each poll is logged (`device-poll <n> <ms since the last>`).
import fs from 'node:fs';
import https from 'node:https';
import crypto from 'node:crypto';
import path from 'node:path';
import Provider from 'oidc-provider';

const [port, certPath, keyPath, keysDir, issuer, redirects] = process.argv.slice(2);
const jwkPath = path.join(keysDir, 'signing.jwk');
if (!fs.existsSync(jwkPath)) {
  fs.mkdirSync(keysDir, { recursive: true });
  const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };
  fs.writeFileSync(jwkPath, JSON.stringify(jwk));
  fs.writeFileSync(path.join(keysDir, 'signing.pem'), privateKey.export({ type: 'pkcs8', format: 'pem' }));
  fs.writeFileSync(path.join(keysDir, 'public.pem'), publicKey.export({ type: 'spki', format: 'pem' }));
}
const signing = JSON.parse(fs.readFileSync(jwkPath, 'utf8'));

// client id → groups in its tokens (null: no groups claim at all).
const GROUPS = { 'sre-agent': ['sre'], 'dev-agent': ['dev'], 'nogroups-agent': null, 'entra-agent': ['6f1c-guid'] };
const clients = Object.keys(GROUPS).map((id) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
}));

// People: login → groups (null: no groups claim).
const PEOPLE = { alice: ['sre'], dave: ['dev'], nina: null };
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
for (const id of ['tollgate-login', 'tollgate-short']) {
  clients.push({
    client_id: id,
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', DEVICE_GRANT],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', ...(redirects ? redirects.split(',') : [])],
  });
}
// A confidential web client (as Google's, Entra's and Okta's web apps are): the code is
// redeemed only with its secret, in an HTTP Basic header.
clients.push({
  client_id: 'tollgate-console',
  client_secret: 'console-secret-4d1f',
  token_endpoint_auth_method: 'client_secret_basic',
  grant_types: ['authorization_code'],
  response_types: ['code'],
  redirect_uris: redirects ? redirects.split(',') : ['https://127.0.0.1/callback'],
});

const provider = new Provider(issuer, {
  jwks: { keys: [signing] },
  clients,
  findAccount: (ctx, id) => ({
    accountId: id,
    claims: () => ({ sub: id, email: `${id}@example.com`, ...(PEOPLE[id] ? { groups: PEOPLE[id] } : {}) }),
  }),
  claims: { openid: ['sub'], profile: ['groups'], email: ['email'] },
  conformIdTokenClaims: false,
  pkce: { required: () => true, methods: ['S256'] },
  ttl: {
    DeviceCode: (ctx, token, client) => (client.clientId === 'tollgate-short' ? 3 : 600),
  },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:tollgate',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => ({
        scope: 'db',
        // RFC 8707: a token for an https resource (an MCP resource's URL) is for that resource.
        audience: resource === 'urn:tollgate' ? 'tollgate' : resource.startsWith('https://') ? resource : 'another-service',
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => {
    const groups = GROUPS[token.clientId];
    return groups ? { groups } : {};
  },
});
provider.proxy = false;

// RFC 8252 §7.3: a loopback redirect URI matches whatever port the native app listens on.
const registeredOnly = provider.Client.prototype.redirectUriAllowed;
provider.Client.prototype.redirectUriAllowed = function redirectUriAllowed(value) {
  if (registeredOnly.call(this, value)) return true;
  let u;
  try { u = new URL(value); } catch { return false; }
  if (u.protocol !== 'http:' || u.hostname !== '127.0.0.1') return false;
  u.port = '';
  return this.redirectUris.includes(u.href);
};

const polls = new Map();
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && ctx.path === '/token') {
    const raw = await new Promise((resolve, reject) => {
      let b = '';
      ctx.req.setEncoding('utf8');
      ctx.req.on('data', (c) => { b += c; });
      ctx.req.on('end', () => resolve(b));
      ctx.req.on('error', reject);
    });
    ctx.req.body = raw;
    const form = new URLSearchParams(raw);
    if (form.get('grant_type') === DEVICE_GRANT) {
      const code = form.get('device_code');
      const seen = polls.get(code);
      const at = Date.now();
      polls.set(code, { n: (seen?.n ?? 0) + 1, at });
      console.log(`device-poll ${(seen?.n ?? 0) + 1} ${seen ? at - seen.at : 0}`);
      if (!seen) {
        ctx.status = 400;
        ctx.body = { error: 'slow_down', error_description: 'poll less often' };
        return;
      }
    }
  }
  await next();
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    ctx.body.interval = 1;
  }
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

https
  .createServer({ cert: fs.readFileSync(certPath), key: fs.readFileSync(keyPath) }, provider.callback())
  .listen(Number(port), '127.0.0.1', () => console.log(`listening ${issuer}`));
