/* The node's sandbox ("pause") process: holds a pod's namespaces, reaps orphans, exits on
 * SIGINT/SIGTERM. Kubernetes' build/pause/linux/pause.c does the same; no image can be pulled
 * here, so memoplane/testing/node_images.py compiles this with `gcc -static`. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction on_stop = {.sa_handler = stop}, on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &on_stop, 0);
  sigaction(SIGTERM, &on_stop, 0);
  sigaction(SIGCHLD, &on_child, 0);
  for (;;) pause();
}
