// node-webot/wechat 2.1 behind express, one worker per core (cluster): echo text
// messages, welcome subscribes; its own signature check and safe-mode crypto.
const cluster = require("node:cluster");
const os = require("node:os");
const express = require("express");
const wechat = require("wechat");

const port = Number(process.argv[2] || 8093);
if (cluster.isPrimary) {
  for (let i = 0; i < os.availableParallelism(); i++) cluster.fork();
} else {
  const app = express();
  const config = {
    token: "qaHeldoutTok2024",
    appid: "wx7c1f0e2a9b3d4e5f",
    encodingAESKey: "Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ",
  };
  app.use("/wechat", wechat(config, (req, res) => {
    const m = req.weixin;
    if (m.MsgType === "text") res.reply(m.Content);
    else res.reply("Welcome");
  }));
  app.listen(port, "127.0.0.1");
}
