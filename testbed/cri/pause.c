/* The pod sandbox's init process: hold the pod's namespaces open, reap orphaned children, exit on
 * SIGINT/SIGTERM. Built static (gcc -static -O2) so the image needs nothing else. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'v') {
        printf("pause (ambient-cni tests) 3.9\n");
        return 0;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not running as PID 1\n");
    }
    struct sigaction term = {0};
    term.sa_handler = on_term;
    sigaction(SIGINT, &term, NULL);
    sigaction(SIGTERM, &term, NULL);
    struct sigaction child = {0};
    child.sa_handler = on_child;
    child.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &child, NULL);
    for (;;) {
        pause();
    }
    return 1;
}
