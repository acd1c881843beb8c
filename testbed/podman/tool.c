/* The one binary of the podman test image (static, no libc in the image): /t and /pause.
 *   t true | ip | sleep N | pause | serve PORT | connect IP PORT MSG
 * "ip" prints "<if> inet <addr>" per IPv4 address; "serve" is a TCP echo server that answers "echo:<data>"
 * and prints "from <peer address>" per connection; "connect" sends MSG and prints the reply (exit 1 when the
 * connection fails or stays silent for 3 s). Invoked as "pause" it pauses (the pod infra container). */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void bye(int s) { (void)s; _exit(0); }

static int list_addresses(void) {
    struct ifaddrs *all, *p;
    char buf[INET_ADDRSTRLEN];
    if (getifaddrs(&all)) return 1;
    for (p = all; p; p = p->ifa_next)
        if (p->ifa_addr && p->ifa_addr->sa_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)p->ifa_addr)->sin_addr, buf, sizeof buf);
            printf("%s inet %s\n", p->ifa_name, buf);
        }
    return 0;
}

static int serve(int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 16)) return 1;
    printf("listening %d\n", port);
    fflush(stdout);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        char data[1024], reply[1100], who[INET_ADDRSTRLEN];
        int c = accept(fd, (struct sockaddr *)&peer, &len);
        if (c < 0) continue;
        ssize_t n = read(c, data, sizeof data - 1);
        if (n > 0) {
            data[n] = 0;
            int m = snprintf(reply, sizeof reply, "echo:%s", data);
            if (write(c, reply, (size_t)m) < 0) { /* the client went away */ }
        }
        inet_ntop(AF_INET, &peer.sin_addr, who, sizeof who);
        printf("from %s\n", who);
        fflush(stdout);
        close(c);
    }
}

static int connect_once(const char *ip, int port, const char *msg) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct timeval tv = {.tv_sec = 3};
    char buf[1100];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || inet_pton(AF_INET, ip, &addr.sin_addr) != 1) return 2;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
    if (write(fd, msg, strlen(msg)) < 0) { perror("write"); return 1; }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n <= 0) { fprintf(stderr, "no reply\n"); return 1; }
    buf[n] = 0;
    printf("%s\n", buf);
    return 0;
}

int main(int argc, char **argv) {
    const char *self = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    const char *cmd = !strcmp(self, "pause") ? "pause" : argc > 1 ? argv[1] : "true";
    signal(SIGTERM, bye);
    signal(SIGINT, bye);
    if (!strcmp(cmd, "true")) return 0;
    if (!strcmp(cmd, "ip")) return list_addresses();
    if (!strcmp(cmd, "sleep")) { sleep(argc > 2 ? (unsigned)atoi(argv[2]) : 1); return 0; }
    if (!strcmp(cmd, "pause") || !strcmp(cmd, "/pause")) for (;;) pause();
    if (!strcmp(cmd, "serve") && argc > 2) return serve(atoi(argv[2]));
    if (!strcmp(cmd, "connect") && argc > 4) return connect_once(argv[2], atoi(argv[3]), argv[4]);
    fprintf(stderr, "usage: t true|ip|sleep N|pause|serve PORT|connect IP PORT MSG\n");
    return 2;
}
