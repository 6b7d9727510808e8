// A real OpenID provider (npm oidc-provider 8) for the OIDC tests, over TLS.
// Usage: node idp.mjs <port> <cert.pem> <key.pem> <keys-dir> <issuer>
// The signing key lives in <keys-dir> (made on first use: signing.jwk private JWK, signing.pem
// PKCS#8, public.pem SPKI), so a test can craft tokens with the IdP's own key, and rotate it by
// restarting with another directory. Clients use the client_credentials grant; access tokens
// are JWTs (resource indicators) with a `groups` claim chosen per client.
import fs from 'node:fs';
import https from 'node:https';
import crypto from 'node:crypto';
import path from 'node:path';
import Provider from 'oidc-provider';

const [port, certPath, keyPath, keysDir, issuer] = process.argv.slice(2);
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

const provider = new Provider(issuer, {
  jwks: { keys: [signing] },
  clients,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:tollgate',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => ({
        scope: 'db',
        audience: resource === 'urn:tollgate' ? 'tollgate' : 'another-service',
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
provider.on('server_error', (ctx, err) => console.error('server_error', err));

https
  .createServer({ cert: fs.readFileSync(certPath), key: fs.readFileSync(keyPath) }, provider.callback())
  .listen(Number(port), '127.0.0.1', () => console.log(`listening ${issuer}`));
