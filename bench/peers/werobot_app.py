"""WeRoBot 1.13 as a WSGI app: echo text messages, welcome subscribes; its own signature
check and safe-mode crypto. Served by granian (see ../load.sh)."""
import werobot

robot = werobot.WeRoBot(
    token="qaHeldoutTok2024",
    encoding_aes_key="Rk9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWQ",
    app_id="wx7c1f0e2a9b3d4e5f",
)
robot.config["SESSION_STORAGE"] = False


@robot.text
def echo(message):
    return message.content


@robot.subscribe
def welcome(message):
    return "Welcome"


app = robot.wsgi
