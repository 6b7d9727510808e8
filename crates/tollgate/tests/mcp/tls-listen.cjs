// Preloaded (node --require) into an HTTP server that cannot be told to use TLS (the reference
// server-everything): its http servers become https servers (TLS_CERT, TLS_KEY), and the
// port each listens on is the only line printed to stdout, as {"port":N} (start it with
// PORT=0); the server's own console.log goes to stderr.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const tls = { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) };
const print = (line) => process.stdout.write(`${line}\n`);
console.log = console.error;
http.createServer = (...args) => {
  const server = https.createServer(tls, ...args.filter((a) => typeof a === 'function'));
  server.on('listening', () => print(JSON.stringify({ port: server.address().port })));
  return server;
};
