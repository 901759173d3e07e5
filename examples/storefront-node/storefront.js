// A storefront in Node.js using DeltaRec over gRPC with nothing but the .proto files
// (@grpc/proto-loader reads them at start; no generated code, no Python).
//
//   COLLECTOR_ADDRESS=127.0.0.1:50051 RANKER_ADDRESS=127.0.0.1:50054 node storefront.js
//
// In a cluster, point both at the headless Services (dns:///ranker.deltarec.svc:8080): the
// channels below ask for round_robin, so calls spread over every ranker pod. A ranker run with
// RANKER_WORKERS=N is N processes on one port, and the kernel gives each *connection* to one of
// them: set RANKER_CONNECTIONS to at least N so that this client opens that many connections
// per address and takes them in turn (one connection would keep the other workers idle).
//
// It upserts a few catalog items, sends behaviour events for a user, asks for recommendations
// and searches for one of the new items by its title, and prints one JSON summary as its last
// line. Exit status 0 only if every step did what DeltaRec promises.
'use strict';

const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.DELTAREC_PROTO_ROOT || path.resolve(__dirname, '..', '..', 'protos');
const COLLECTOR = process.env.COLLECTOR_ADDRESS || '127.0.0.1:50051';
const RANKER = process.env.RANKER_ADDRESS || '127.0.0.1:50054';
const SEARCH_WAIT_MS = Number(process.env.SEARCH_WAIT_MS || 30000);
const RANKER_CONNECTIONS = Number(process.env.RANKER_CONNECTIONS || 1);
if (!Number.isInteger(RANKER_CONNECTIONS) || RANKER_CONNECTIONS < 1 || RANKER_CONNECTIONS > 64) {
  console.error(`RANKER_CONNECTIONS: ${process.env.RANKER_CONNECTIONS} is not an integer in 1..64`);
  process.exit(2);
}

const definition = protoLoader.loadSync(
  ['deltarec/v1/collector.proto', 'deltarec/v1/ranker.proto'],
  {includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true});
const v1 = grpc.loadPackageDefinition(definition).deltarec.v1;

const channelOptions = {
  'grpc.service_config': JSON.stringify({loadBalancingConfig: [{round_robin: {}}]}),
};
const collector = new v1.CollectorService(COLLECTOR, grpc.credentials.createInsecure(), channelOptions);
// Clients on one target share one connection unless each has its own subchannel pool.
const rankers = Array.from({length: RANKER_CONNECTIONS}, () => new v1.RankerService(
  RANKER, grpc.credentials.createInsecure(), {...channelOptions, 'grpc.use_local_subchannel_pool': 1}));
let rankerTurn = 0;
const ranker = () => rankers[rankerTurn++ % rankers.length];   // the next connection

function call(client, method, request, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: Date.now() + timeoutMs}, (error, response) => {
      if (error) {
        error.message = `${method}: ${grpc.status[error.code]} ${error.details}`;
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const run = crypto.randomBytes(4).toString('hex');
  const user = `node-user-${run}`;
  // A word no catalog has, so the search below can only find our item.
  const marker = `zephyrine${run}`;
  const items = [
    {item_id: `node-${run}-1`, title: `Rose ${marker} Lip Balm`, category: 'Beauty > Lips', brand: 'Belle Rose',
      price: {currency_code: 'EUR', units: 4, nanos: 500000000}, active: true},
    {item_id: `node-${run}-2`, title: 'Argan Night Cream', category: 'Beauty > Skin', brand: 'Atlas',
      price: {currency_code: 'EUR', units: 19, nanos: 0}, active: true},
    {item_id: `node-${run}-3`, title: 'Lavender Hand Soap', category: 'Beauty > Bath', brand: 'Provence',
      price: {currency_code: 'EUR', units: 6, nanos: 0}, active: true},
  ];
  const upsert = await call(collector, 'UpsertItems', {items});

  const now = Math.floor(Date.now() / 1000);
  const events = [
    {event_id: `${run}-e1`, type: 'EVENT_TYPE_VIEW', user_id: user, item_id: items[0].item_id,
      timestamp: {seconds: now - 30, nanos: 0}},
    {event_id: `${run}-e2`, type: 'EVENT_TYPE_ADD_TO_CART', user_id: user, item_id: items[0].item_id,
      timestamp: {seconds: now - 20, nanos: 0}},
    {event_id: `${run}-e3`, type: 'EVENT_TYPE_PURCHASE', user_id: user, item_id: items[0].item_id,
      timestamp: {seconds: now - 10, nanos: 0}},
    {event_id: `${run}-e4`, type: 'EVENT_TYPE_SEARCH', user_id: user, query: 'night cream',
      timestamp: {seconds: now, nanos: 0}},
  ];
  const ingest = await call(collector, 'IngestEvents', {events});
  // Idempotent by event_id: the same batch again is all duplicates.
  const again = await call(collector, 'IngestEvents', {events});

  // The new item reaches the ranker's index through the delta stream within moments; ask until
  // it is there or the wait is over.
  let search;
  const deadline = Date.now() + SEARCH_WAIT_MS;
  for (;;) {
    search = await call(ranker(), 'Search', {query: marker, user_id: user, k: 5});
    if (search.items.some((item) => item.item_id === items[0].item_id) || Date.now() > deadline) break;
    await sleep(200);
  }

  // Now that the catalog has them: recommendations for the user (without a trained model yet,
  // popular and fresh items; each answer names the model version it came from).
  const recommend = await call(ranker(), 'Recommend', {user_id: user, k: 5});

  const summary = {
    upserted: upsert.upserted,
    events_accepted: ingest.accepted,
    events_duplicate_on_retry: again.duplicates,
    recommended: recommend.items.map((item) => item.item_id),
    recommend_model_version: Number(recommend.freshness ? recommend.freshness.model_version : 0),
    search_hits: search.items.map((item) => item.item_id),
    search_found_new_item: search.items.length > 0 && search.items[0].item_id === items[0].item_id,
  };
  console.log(JSON.stringify(summary));
  const ok = summary.upserted === items.length && summary.events_accepted === events.length
    && summary.events_duplicate_on_retry === events.length && summary.search_found_new_item;
  return ok ? 0 : 1;
}

main().then((code) => {
  collector.close();
  rankers.forEach((client) => client.close());
  process.exitCode = code;
}, (error) => {
  console.error(error.message);
  process.exitCode = 2;
});
