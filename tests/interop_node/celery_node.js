// The celery-node side of the interoperability tests (npm package celery-node, installed by the test fixture).
//
//   node celery_node.js client BROKER_URL QUEUE TASKS_JSON   sends [[id, name, args], ...] to QUEUE
//   node celery_node.js worker BROKER_URL QUEUE              serves interop.add / interop.fail from QUEUE
//
// The client connects as celery-node does (isReady() declares QUEUE, with no arguments), publishes each
// task through celery-node's own broker code (which declares the queue again), prints "sent", and closes.
// The worker prints "consuming" once subscribed and one "ran NAME ID RESULT" line per task; results go to
// celery-node's own AMQP result backend (a queue per task id).
"use strict";
const celery = require("celery-node");

async function client(url, queue, tasks) {
  const app = celery.createClient(url, url, queue);
  await app.isReady();
  for (const [id, name, args] of tasks) {
    const message = app.createTaskMessage(id, name, args, {});
    await app.broker.publish(message.body, "", queue, message.headers, message.properties);
  }
  console.log("sent");
  await app.disconnect();
}

async function worker(url, queue) {
  const app = celery.createWorker(url, url, queue);
  app.register("interop.add", (x, y) => {
    console.log(`ran interop.add ${x + y}`);
    return x + y;
  });
  app.register("interop.fail", (message) => {
    throw new Error(message);
  });
  await app.isReady();
  await app.processTasks();
  console.log("consuming");
}

const [mode, brokerUrl, queue, tasks] = process.argv.slice(2);
// amqplib offers a frame_max of 4096 by default; RabbitMQ 4.1+ requires at least 8192 and resets the connection.
const url = `${brokerUrl}${brokerUrl.includes("?") ? "&" : "?"}frameMax=131072`;
const run = mode === "client" ? client(url, queue, JSON.parse(tasks)) : worker(url, queue);
run.catch((error) => {
  console.error(`celery-node ${mode} failed: ${error.message}`);
  process.exit(1);
});
