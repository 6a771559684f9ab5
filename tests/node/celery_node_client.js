// A celery-node client: sends one task and reads its result through celery-node's amqp result backend.
// Usage: node celery_node_client.js BROKER_URL QUEUE TASK_NAME ARG...   (prints {"id", "value"} as JSON)
const celery = require("celery-node");

const [broker, queue, name, ...args] = process.argv.slice(2);
const client = celery.createClient(broker, broker, queue);
const result = client.createTask(name).applyAsync(args.map(Number), {});
result
  .get(30000)
  .then((value) => {
    console.log(JSON.stringify({ id: result.taskId, value }));
    return client.disconnect();
  })
  .then(() => process.exit(0))
  .catch((error) => {
    console.error(error);
    process.exit(1);
  });
