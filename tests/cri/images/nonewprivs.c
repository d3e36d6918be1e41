/* Installed set-user-ID root in the CRI tests' nonewprivs image: prints the effective uid it
 * runs with, which stays the caller's when no_new_privs is set. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
